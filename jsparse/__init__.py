"""jsparse: sparse LLM pre-training for JAX/Flax on NVIDIA Hopper GPUs.

The public surface is re-exported here explicitly; everything else is private.
"""

from jsparse.formats import Sparse24 as Sparse24
from jsparse.formats import VNMPacked as VNMPacked
from jsparse.formats import pack_24 as pack_24
from jsparse.formats import pack_vnm as pack_vnm
from jsparse.formats import unpack_24 as unpack_24
from jsparse.formats import unpack_vnm as unpack_vnm
from jsparse.kernels._common import pallas_interpret as pallas_interpret
from jsparse.kernels.compress.api import BitmaskPacked as BitmaskPacked
from jsparse.kernels.compress.api import pack_bitmask as pack_bitmask
from jsparse.kernels.compress.api import unpack_bitmask as unpack_bitmask
from jsparse.kernels.activation.api import squared_relu_nm as squared_relu_nm
from jsparse.kernels.nm.api import nm_mask as nm_mask
from jsparse.kernels.nm.api import nm_prune as nm_prune
from jsparse.kernels.nm.api import nm_prune_like as nm_prune_like
from jsparse.kernels.nm.api import soft_threshold_24 as soft_threshold_24
from jsparse.kernels.nm.api import sste_scale as sste_scale
from jsparse.kernels.nm.api import transposable_24_mask as transposable_24_mask
from jsparse.kernels.nm.api import transposable_24_prune as transposable_24_prune
from jsparse.kernels.sparse_matmul.api import compress_24 as compress_24
from jsparse.kernels.sparse_matmul.api import sparse_matmul as sparse_matmul
from jsparse.kernels.sparse_matmul.api import sparse_tn_matmul as sparse_tn_matmul
from jsparse.kernels.sparse_matmul.recipe_bwd import recipe24_backward as recipe24_backward
from jsparse.kernels.sparse_matmul.recipe_bwd import squared_relu_counts as squared_relu_counts
from jsparse.kernels.sparse_matmul.api import squared_relu_24_compress as squared_relu_24_compress
from jsparse.kernels.sparse_matmul.compressed import Compressed24 as Compressed24
from jsparse.kernels.vnm.api import vnm_mask as vnm_mask
from jsparse.kernels.vnm.api import vnm_prune as vnm_prune
from jsparse.kernels.grouped_matmul.api import grouped_matmul as grouped_matmul
from jsparse.kernels.grouped_matmul.api import grouped_matmul_t as grouped_matmul_t
from jsparse.kernels.routed_ffn.api import routed_ffn as routed_ffn
from jsparse.router import RouterConfig as RouterConfig
from jsparse.router import RouterState as RouterState
from jsparse.router import captured_mass as captured_mass
from jsparse.router import neuron_groups as neuron_groups
from jsparse.router import route_tokens as route_tokens
from jsparse.router import router_init as router_init
from jsparse.router import router_recluster as router_recluster
from jsparse.router import router_update as router_update
from jsparse.router import settle_permutation as settle_permutation
from jsparse.router import take_neurons as take_neurons
from jsparse.remat import load_activation as load_activation
from jsparse.remat import remat_policy as remat_policy
from jsparse.remat import squared_relu_ffn as squared_relu_ffn
from jsparse.remat import store_activation as store_activation

__version__ = "0.1.0"
