// ComfyUI-WanTuner front-end extension (loss curve on the trainer node lands with the training issue).
import { app } from "../../scripts/app.js";

app.registerExtension({ name: "WanTuner.core" });
