"""mia-lightning: train target/shadow models with Lightning and audit them with membership inference attacks."""

__version__ = "0.1.0"
