// Shows the LoRA loader's report (matched modules, unmatched keys) under the node after it runs.
// The node returns {"ui": {"text": [report]}}; ComfyUI hands that to onExecuted.
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const NODE = "WanTunerLoRALoader";
const WIDGET = "lora_report";

app.registerExtension({
  name: "WanTuner.LoRAReport",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = (message?.text ?? []).join("\n");
      let widget = this.widgets?.find((w) => w.name === WIDGET);
      if (!widget) {
        widget = ComfyWidgets.STRING(this, WIDGET, ["STRING", { multiline: true }], app).widget;
        widget.inputEl.readOnly = true;
        widget.serialize = false; // display only: not part of the saved widget values
      }
      widget.value = text;
      this.setDirtyCanvas(true, true);
    };
  },
});
