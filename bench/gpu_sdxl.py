"""The SDXL twin of bench/gpu_sd15.py: a tiny SDXL-shaped model (two text encoders, pooled
embeddings and size/crop ids) at SDXL's resolution (1024×1024, 4×128×128 latents).

    .venv/bin/python bench/gpu_sdxl.py                          # on a GPU machine
    .venv/bin/python bench/gpu_sdxl.py --size 64 --steps 4      # CPU smoke test of the same path
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_sd15 import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("sdxl"))
