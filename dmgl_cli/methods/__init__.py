"""Methods as hooks on the shared training loop; ``METHODS`` is the explicit registry (name -> class)."""

from __future__ import annotations

from dmgl_cli.errors import DmglError
from dmgl_cli.methods.affine import AffineMethod
from dmgl_cli.methods.agm import AGMMethod
from dmgl_cli.methods.base import ConcatMethod, Method
from dmgl_cli.methods.channel import ChannelMethod
from dmgl_cli.methods.dmgl_official import DMGLOfficialEq3Method, DMGLOfficialMethod
from dmgl_cli.methods.domfn import DOMFNMethod
from dmgl_cli.methods.etmc import ETMCMethod
from dmgl_cli.methods.g_blend import GBlendMethod
from dmgl_cli.methods.greedy import GreedyMethod
from dmgl_cli.methods.ml_lstm import MLLSTMMethod
from dmgl_cli.methods.mla import MLAMethod
from dmgl_cli.methods.mses import MSESMethod
from dmgl_cli.methods.mslr import MSLRMethod
from dmgl_cli.methods.ogm_ge import OGMGEMethod
from dmgl_cli.methods.pmr import PMRMethod
from dmgl_cli.methods.sum import SumMethod
from dmgl_cli.methods.unimodal import UnimodalMethod
from dmgl_cli.methods.weight import WeightMethod

METHODS: dict[str, type[Method]] = {
    ConcatMethod.name: ConcatMethod,
    UnimodalMethod.name: UnimodalMethod,
    SumMethod.name: SumMethod,
    WeightMethod.name: WeightMethod,
    AffineMethod.name: AffineMethod,
    ChannelMethod.name: ChannelMethod,
    MLLSTMMethod.name: MLLSTMMethod,
    ETMCMethod.name: ETMCMethod,
    MSESMethod.name: MSESMethod,
    GBlendMethod.name: GBlendMethod,
    OGMGEMethod.name: OGMGEMethod,
    GreedyMethod.name: GreedyMethod,
    DOMFNMethod.name: DOMFNMethod,
    MSLRMethod.name: MSLRMethod,
    PMRMethod.name: PMRMethod,
    AGMMethod.name: AGMMethod,
    MLAMethod.name: MLAMethod,
    DMGLOfficialMethod.name: DMGLOfficialMethod,
    DMGLOfficialEq3Method.name: DMGLOfficialEq3Method,
}


def build_method(config) -> Method:
    """The method a validated config names (``config.validate`` checked that it can run with the strategy)."""
    name = config.method.name
    if name not in METHODS:
        raise DmglError(f"unknown method {name!r}; valid: {', '.join(METHODS)}")
    method = METHODS[name](config, config.method_options(name))
    method.check()
    return method
