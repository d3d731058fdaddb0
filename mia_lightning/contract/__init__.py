"""The experiment contract between stages: directory layout, model outputs, attack runs, atomic io, trusted class resolution."""
