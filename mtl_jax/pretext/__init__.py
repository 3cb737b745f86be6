"""Pretext tasks: labels made from the inputs themselves.

`vision` holds the image pretexts, each a `Pretext` spec whose transform is a
pure, jit-able `(rng, images) -> (view, target, mask)`; `get_pretext(name,
**hyperparams)` builds one by name (`PRETEXTS`). `views` turns a pretext into
a task (`pretext_task`) and makes its view, label and mask inside the step
(`add_views`). `cluster` is the unsupervised DeepCluster-style task
(`cluster_task`, k-means in `kmeans`); `learnability` scores trained pretext
heads against trivial baselines.
"""

from mtl_jax.pretext.cluster import cluster_task
from mtl_jax.pretext.views import add_views
from mtl_jax.pretext.views import batch_views
from mtl_jax.pretext.views import pretext_task
from mtl_jax.pretext.vision import BT601
from mtl_jax.pretext.vision import PRETEXTS
from mtl_jax.pretext.vision import Pretext
from mtl_jax.pretext.vision import blur_region
from mtl_jax.pretext.vision import colourise
from mtl_jax.pretext.vision import denoise
from mtl_jax.pretext.vision import downsample_upsample
from mtl_jax.pretext.vision import gaussian_blur
from mtl_jax.pretext.vision import get_pretext
from mtl_jax.pretext.vision import grid_cells
from mtl_jax.pretext.vision import grid_mask
from mtl_jax.pretext.vision import luminance
from mtl_jax.pretext.vision import pretext_names
from mtl_jax.pretext.vision import reconstruct
from mtl_jax.pretext.vision import rotate
from mtl_jax.pretext.vision import super_resolve
