"""`python -m lightning_qlora.cli`: the training command without the console script."""

from lightning_qlora.cli.train import main

main()
