"""`bert_port.config`: BertConfig and its tables, defined in the torch-free `converters.config`."""
from converters.config import ACTIVATIONS, LIMITS, MAX_CONFIG_BYTES, MAX_PARAMETERS, BertConfig, parameter_count

__all__ = ["ACTIVATIONS", "LIMITS", "MAX_CONFIG_BYTES", "MAX_PARAMETERS", "BertConfig", "parameter_count"]
