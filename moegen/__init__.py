"""moegen: a Mixture-of-Experts inference accelerator generator and co-design flow.

Subpackages: :mod:`moegen.rtl` (Amaranth hardware), :mod:`moegen.golden` (PyTorch
reference, bit-exact where integer), :mod:`moegen.hls` (co-design flow), :mod:`moegen.host`
(driver and offload), :mod:`moegen.boards` (board targets). One :class:`AccelConfig`
drives them all.
"""

from .config import AccelConfig, load_config
from .errors import ConfigError, UserError

__version__ = "0.1.0"

__all__ = ["AccelConfig", "ConfigError", "UserError", "__version__", "load_config"]
