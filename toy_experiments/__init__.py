"""Toy reproductions of the anti-grokking experiments (MNIST MLP, modular addition)."""
