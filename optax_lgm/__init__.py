"""optax_lgm: layer-aware gradient transformations for Optax.

Layerwise Gradient Modulation (:func:`scale_by_lgm`, :func:`lgm`), Dynamic
Gradient Scaling (:func:`scale_by_dgs`, :func:`dgs`) and partial-layer
sharpness-aware minimisation, each a chainable
:class:`optax.GradientTransformationExtraArgs` that works on any pytree.
"""

from optax_lgm._dgs import ScaleByDgsState as ScaleByDgsState
from optax_lgm._dgs import dgs as dgs
from optax_lgm._dgs import scale_by_dgs as scale_by_dgs
from optax_lgm._diagnostics import layer_stats as layer_stats
from optax_lgm._keep_top_k import KeepTopKLayersState as KeepTopKLayersState
from optax_lgm._keep_top_k import keep_top_k_layers as keep_top_k_layers
from optax_lgm._layer_sam import LayerSamState as LayerSamState
from optax_lgm._layer_sam import layer_sam as layer_sam
from optax_lgm._layer_sam import select_layers as select_layers
from optax_lgm._layers import layer_names as layer_names
from optax_lgm._lgm import ScaleByLgmState as ScaleByLgmState
from optax_lgm._lgm import lgm as lgm
from optax_lgm._lgm import scale_by_lgm as scale_by_lgm
from optax_lgm._state_names import LayerNames as LayerNames
from optax_lgm._static import StaticSelection as StaticSelection

__version__ = "0.1.0"

__all__ = (
    "KeepTopKLayersState",
    "LayerNames",
    "LayerSamState",
    "ScaleByDgsState",
    "ScaleByLgmState",
    "StaticSelection",
    "dgs",
    "keep_top_k_layers",
    "layer_names",
    "layer_sam",
    "layer_stats",
    "lgm",
    "scale_by_dgs",
    "scale_by_lgm",
    "select_layers",
)
