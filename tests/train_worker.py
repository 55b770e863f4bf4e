"""A training process for the multi-process tests: ``python train_worker.py CONFIG OUT DUMP`` (under
torchrun or alone) trains CONFIG into OUT and saves this process's final weights as
DUMP/rank<RANK>.safetensors, so a test can compare the ranks with each other and with one process."""

import os
import sys

from safetensors.torch import save_file

from pneumoseg.train import load_config
from pneumoseg.train.engine import train

config, out, dump = sys.argv[1:4]
result = train(load_config(config), out, progress=False)
rank = os.environ.get("RANK", "single")
save_file({k: v.contiguous() for k, v in result.model.state_dict().items()}, os.path.join(dump, f"rank{rank}.safetensors"),
          metadata={"steps": str(result.steps), "val_loss": repr(result.metrics["val_loss"]),
                    "validation_images": str(result.metrics["validation_images"])})
