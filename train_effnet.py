"""Train or test an EfficientNet waste classifier: `python train_effnet.py --help`."""

import sys

from detect_waste_cls.cli import main_script

if __name__ == "__main__":
    sys.exit(main_script(default_model="efficientnet-lite0"))
