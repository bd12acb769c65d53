"""Train a student: ``python train.py experiment=color_mnist/baseline`` (see README)."""

from cdistill.cli.train import main

if __name__ == "__main__":
    main()
