"""Base -> concept distillation -> evaluation: ``python pipeline.py experiment=color_mnist/cd``."""

from cdistill.cli.pipeline import main

if __name__ == "__main__":
    main()
