"""relaxtune: fine-tune pretrained interatomic potentials by backpropagating through structural relaxations."""

__version__ = "0.1.0"
