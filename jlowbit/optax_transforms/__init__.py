"""8-bit blockwise optimizers as optax transformations.

* :mod:`~jlowbit.optax_transforms.aliases`: ``adam_8bit``, ``adamw_8bit``,
  ``ademamix_8bit``, ``lion_8bit``, ``sgd_8bit``, ``rmsprop_8bit``,
  ``adagrad_8bit``, ``lamb_8bit``, ``lars_8bit`` and their ``*_32bit`` twins;
* :mod:`~jlowbit.optax_transforms.transforms`: the ``scale_by_*_8bit``
  building blocks;
* :mod:`~jlowbit.optax_transforms.clipping`: ``percentile_clipping``;
* :mod:`~jlowbit.optax_transforms.offload`: ``offload_state`` (state kept
  in host memory between steps);
* :mod:`~jlowbit.optax_transforms.state`: state NamedTuples and
  :class:`Quantized8bitMoment`;
* :mod:`~jlowbit.optax_transforms.sharding`: ``state_shardings``;
* :mod:`~jlowbit.optax_transforms.apply`: ``update_and_apply`` (one step
  that writes the parameters, fused into the kernel for the aliases) and
  ``chain`` (an ``optax.chain`` that stays fused).

The step itself is the functional op :func:`jlowbit.update8.update_8bit`
(:func:`jlowbit.update8.apply_8bit` when it writes the parameters).
"""

from jlowbit.optax_transforms.aliases import (
    adagrad_8bit,
    adagrad_32bit,
    adam_8bit,
    adam_32bit,
    adamw_8bit,
    adamw_32bit,
    ademamix_8bit,
    ademamix_32bit,
    lamb_8bit,
    lamb_32bit,
    lars_8bit,
    lars_32bit,
    lion_8bit,
    lion_32bit,
    rmsprop_8bit,
    rmsprop_32bit,
    sgd_8bit,
    sgd_32bit,
)
from jlowbit.optax_transforms.apply import chain, update_and_apply
from jlowbit.optax_transforms.checks import STATIC_ARGS
from jlowbit.optax_transforms.clipping import (
    PercentileClippingState,
    percentile_clipping,
)
from jlowbit.optax_transforms.offload import offload_state
from jlowbit.optax_transforms.sharding import state_shardings
from jlowbit.optax_transforms.state import (
    FLOAT32_STATE,
    Quantized8bitMoment,
    ScaleByAdam8bitState,
    ScaleByAdemamix8bitState,
    ScaleByLion8bitState,
    ScaleByMomentum8bitState,
    ScaleByRms8bitState,
    ScaleByRss8bitState,
)
from jlowbit.optax_transforms.transforms import (
    ademamix_schedules,
    scale_by_adam_8bit,
    scale_by_ademamix_8bit,
    scale_by_lion_8bit,
    scale_by_momentum_8bit,
    scale_by_rms_8bit,
    scale_by_rss_8bit,
)
