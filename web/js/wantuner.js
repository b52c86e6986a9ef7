// ComfyUI-WanTuner's base front-end extension. The trainer node's live loss chart is in wantuner_training.js, the
// LoRA loader's report in wantuner_lora_report.js.
import { app } from "../../scripts/app.js";

app.registerExtension({ name: "WanTuner.core" });
