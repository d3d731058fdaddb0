"""The one exception type the CLIs turn into a one-line message and a non-zero exit."""


class MiaError(Exception):
    """A user-facing error: the message names the file or option at fault and how to fix it."""


def load_failure(err: Exception) -> str:
    """A short reason for a failed ``torch.load`` / safetensors read: the global a ``weights_only`` load refused, else the type and first line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    refused = next((line for line in lines if "Unsupported global:" in line), None)
    if refused is not None:  # a pickled object that is not a tensor or plain value, e.g. a numpy scalar among the hyper-parameters
        return f"a weights-only load refuses {refused.split('Unsupported global:', 1)[1].split(' was not')[0].strip()}"
    if not lines or lines[0].startswith("Weights only load failed"):  # torch's generic preamble says nothing about this file
        return type(err).__name__
    return f"{type(err).__name__}: {lines[0][:160]}"
