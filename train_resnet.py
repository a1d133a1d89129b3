"""Train or test a ResNet waste classifier: `python train_resnet.py --help`."""

import sys

from detect_waste_cls.cli import main_script

if __name__ == "__main__":
    sys.exit(main_script(default_model="resnet50"))
