"""Behaviour of the VAE and the ConvNeXt U-Net: shapes, the posterior's maths, timestep
conditioning, determinism, gradient flow, torch.compile / channels_last, and that the
VAE can actually learn (a tiny overfitting run)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from ldm_cli.config import UNetConfig, VAEModelConfig
from ldm_cli.models import unet as unet_module
from ldm_cli.models.unet import SHORT_SEQUENCE, ConvNeXtBlock, UNet, attention, timestep_embedding
from ldm_cli.models.vae import VAE, DiagonalGaussian


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """These models are tiny: one thread loses little, and it keeps the file fast when
    other processes share the CPU (two intra-op threads on a busy 2-core machine ran
    the overfitting test 6–10× slower than one thread)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


SMALL_VAE = dict(base_channels=32, channel_mults=[1, 2, 2], downsample_factor=4, latent_channels=4)


def tiny_vae(mults: list[int], latent_channels: int = 4, base: int = 8, res_blocks: int = 1) -> VAE:
    factor = 2 ** (len(mults) - 1)
    return VAE(
        VAEModelConfig(
            base_channels=base,
            channel_mults=mults,
            downsample_factor=factor,
            latent_channels=latent_channels,
            num_res_blocks=res_blocks,
        )
    )


def tiny_unet(**overrides) -> UNet:
    settings = dict(latent_channels=4, latent_size=8, base_channels=16, channel_mults=[1, 2], blocks_per_level=1)
    settings.update(overrides)
    return UNet(UNetConfig(**settings))


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# --------------------------------------------------------------------------- VAE


@pytest.mark.parametrize(
    ("mults", "latent_channels", "res_blocks"),
    [([1], 3, 1), ([1, 2], 4, 2), ([1, 2, 2], 8, 1), ([1, 1, 2, 2], 1, 1)],
    ids=["f1", "f2", "f4", "f8"],
)
def test_vae_keeps_image_shape_and_shrinks_latents_by_its_downsample_factor(mults: list[int], latent_channels: int, res_blocks: int) -> None:
    torch.manual_seed(0)
    vae = tiny_vae(mults, latent_channels, res_blocks=res_blocks)
    f = 2 ** (len(mults) - 1)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    recon, posterior = vae(x)
    assert recon.shape == x.shape
    assert posterior.mean.shape == (2, latent_channels, 16 // f, 16 // f)
    assert posterior.logvar.shape == posterior.mean.shape
    assert vae.decode(posterior.mode()).shape == x.shape
    assert vae.latent_shape(32) == (latent_channels, 32 // f, 32 // f)
    assert torch.isfinite(recon).all()


def test_latent_shape_rejects_indivisible_resolution() -> None:
    vae = tiny_vae([1, 2, 2])
    assert vae.latent_shape(64) == (4, 16, 16)
    with pytest.raises(ValueError, match="multiple of the VAE downsample factor 4"):
        vae.latent_shape(30)
    with pytest.raises(ValueError, match="multiples of 4"):
        vae.encode(torch.zeros(1, 3, 30, 30))


def test_vae_stores_its_config() -> None:
    cfg = VAEModelConfig(**SMALL_VAE)
    assert VAE(cfg).cfg is cfg


def test_posterior_logvar_is_clamped() -> None:
    mean = torch.zeros(5)
    logvar = torch.tensor([-100.0, -30.0, 0.0, 20.0, 100.0])
    posterior = DiagonalGaussian(mean, logvar, logvar_min=-30.0, logvar_max=20.0)
    assert posterior.logvar.tolist() == [-30.0, -30.0, 0.0, 20.0, 20.0]
    assert torch.isfinite(posterior.std).all() and (posterior.std > 0).all()

    # and the VAE passes its config's bounds through
    vae = VAE(VAEModelConfig(**SMALL_VAE, logvar_min=-1.0, logvar_max=0.5))
    with torch.no_grad():
        vae.encoder.conv_out.bias.fill_(50.0)  # pushes every logvar far above the bound
    posterior = vae.encode(torch.zeros(1, 3, 8, 8))
    assert posterior.logvar.max().item() == 0.5


def test_kl_matches_torch_distributions() -> None:
    g = torch.Generator().manual_seed(1)
    mean = torch.randn(2, 4, 3, 3, generator=g) * 2
    logvar = torch.randn(2, 4, 3, 3, generator=g) * 3
    posterior = DiagonalGaussian(mean, logvar)
    expected = kl_divergence(Normal(mean, (0.5 * logvar).exp()), Normal(torch.zeros_like(mean), torch.ones_like(mean)))
    assert posterior.kl().shape == mean.shape
    torch.testing.assert_close(posterior.kl(), expected, rtol=1e-5, atol=1e-5)
    # a posterior equal to the prior costs nothing
    assert DiagonalGaussian(torch.zeros(3), torch.zeros(3)).kl().abs().max().item() == 0.0


def test_sample_uses_generator_and_reparameterises() -> None:
    mean = torch.full((4, 8, 8), 3.0)
    logvar = torch.full((4, 8, 8), math.log(0.25))
    posterior = DiagonalGaussian(mean, logvar)
    first = posterior.sample(torch.Generator().manual_seed(7))
    again = posterior.sample(torch.Generator().manual_seed(7))
    other = posterior.sample(torch.Generator().manual_seed(8))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    # z = μ + σ·ε with the generator's ε
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(first, mean + 0.5 * eps)
    assert torch.equal(posterior.mode(), mean)

    # the VAE's forward passes the generator on
    vae = tiny_vae([1, 2])
    x = torch.rand(2, 3, 8, 8)
    a, _ = vae(x, generator=torch.Generator().manual_seed(3))
    b, _ = vae(x, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def smooth_images(count: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Random sums of a few low-frequency plane waves per channel, scaled into [-1, 1]."""
    coords = torch.linspace(0, 1, size)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    frequency = torch.rand(count, 3, 3, 2, generator=generator) * 3
    phase = torch.rand(count, 3, 3, generator=generator) * 2 * math.pi
    amplitude = torch.rand(count, 3, 3, generator=generator)
    waves = torch.sin(2 * math.pi * (frequency[..., 0, None, None] * xx + frequency[..., 1, None, None] * yy) + phase[..., None, None])
    images = (amplitude[..., None, None] * waves).sum(dim=2)
    return images / images.abs().amax(dim=(1, 2, 3), keepdim=True)


def test_small_vae_overfits_a_fixed_batch() -> None:
    """The small VAE (f = 4, 16×16 images → 4×4×4 latents) cuts the reconstruction MSE
    of a fixed batch of 8 smooth images at least 5× in 80 Adam steps (≈ 30× in practice)."""
    torch.manual_seed(0)
    images = smooth_images(8, 16, torch.Generator().manual_seed(0))
    vae = VAE(VAEModelConfig(**SMALL_VAE))
    optimizer = torch.optim.Adam(vae.parameters(), lr=2e-3)

    def reconstruction_mse() -> float:
        with torch.no_grad():
            return torch.mean((vae.decode(vae.encode(images).mode()) - images) ** 2).item()

    before = reconstruction_mse()
    for _ in range(80):
        recon, posterior = vae(images)
        loss = torch.mean((recon - images) ** 2) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = reconstruction_mse()
    assert after < before / 5, (before, after)


# --------------------------------------------------------------------------- timestep embedding


def test_timestep_embedding_is_sin_then_cos_of_geometric_frequencies() -> None:
    t = torch.tensor([0, 1, 250, 999])
    dim = 8
    emb = timestep_embedding(t, dim)
    assert emb.shape == (4, dim) and emb.dtype == torch.float32
    for row, step in enumerate(t.tolist()):
        for k in range(dim // 2):
            omega = 10000.0 ** (-k / (dim // 2))
            assert emb[row, k].item() == pytest.approx(math.sin(step * omega), abs=1e-4)
            assert emb[row, dim // 2 + k].item() == pytest.approx(math.cos(step * omega), abs=1e-4)
    # t = 0 is [0…0, 1…1]; odd dims get one zero at the end; float timesteps work
    torch.testing.assert_close(emb[0], torch.tensor([0.0] * 4 + [1.0] * 4))
    odd = timestep_embedding(torch.tensor([3.5]), 7)
    assert odd.shape == (1, 7) and odd[0, -1].item() == 0.0
    assert odd[0, 0].item() == pytest.approx(math.sin(3.5))


# --------------------------------------------------------------------------- U-Net


@pytest.mark.parametrize(
    "overrides",
    [
        dict(channel_mults=[1], latent_size=4),
        dict(channel_mults=[1, 2], latent_size=8, attention_levels=[1]),
        dict(channel_mults=[2, 2, 3], latent_size=8, attention_levels=[0, 2], attention_heads=2),
        dict(channel_mults=[1, 2, 2, 2], latent_size=16, blocks_per_level=2, attention_levels=[3], dropout=0.1),
        dict(channel_mults=[1, 2], latent_size=16, latent_channels=3, mlp_ratio=2),
    ],
    ids=["1-level", "2-levels-attn", "3-levels-attn", "4-levels-dropout", "3-channels"],
)
def test_unet_output_shape_matches_input(overrides: dict) -> None:
    torch.manual_seed(0)
    unet = tiny_unet(**overrides)
    size = unet.cfg.latent_size
    z = torch.randn(2, unet.cfg.latent_channels, size, size)
    out = unet(z, torch.tensor([0, 999]))
    assert out.shape == z.shape
    assert torch.isfinite(out).all()
    # any side divisible by 2**(levels-1) works, not only latent_size
    bigger = torch.randn(1, unet.cfg.latent_channels, 2 * size, 2 * size)
    assert unet(bigger, torch.tensor([5])).shape == bigger.shape


def test_unet_rejects_bad_shapes_and_heads() -> None:
    unet = tiny_unet(channel_mults=[1, 2, 2], latent_size=8)
    with pytest.raises(ValueError, match="multiples of 4"):
        unet(torch.zeros(1, 4, 6, 6), torch.tensor([1]))
    with pytest.raises(ValueError, match="not divisible by attention_heads"):
        tiny_unet(base_channels=6, attention_levels=[0], attention_heads=4)


def test_timestep_wiring_changes_output_at_init() -> None:
    """With layer_scale_init = 1 every block's residual branch is at full strength, so
    at initialisation the output must clearly depend on t. (With the default 1e-6 the
    branches, and with them t, contribute ~1e-6 at init — see the next test.)"""
    torch.manual_seed(0)
    unet = tiny_unet(layer_scale_init=1.0, attention_levels=[1]).eval()
    z = torch.randn(2, 4, 8, 8)
    early = unet(z, torch.tensor([10, 10]))
    late = unet(z, torch.tensor([900, 900]))
    assert relative_difference(early, late) > 1e-2
    # the embedding is per sample: one batch with two timesteps = two batches
    mixed = unet(z, torch.tensor([10, 900]))
    torch.testing.assert_close(mixed[0], early[0])
    torch.testing.assert_close(mixed[1], late[1])


def test_default_unet_learns_to_use_t() -> None:
    """With the default layer scale 1e-6 the net starts nearly t-independent (each block
    starts as the identity); a few Adam steps on a t-dependent target make it depend on t."""
    torch.manual_seed(0)
    unet = tiny_unet()
    z = torch.randn(8, 4, 8, 8)
    t_early, t_late = torch.full((8,), 50), torch.full((8,), 950)
    with torch.no_grad():
        assert relative_difference(unet(z, t_early), unet(z, t_late)) < 1e-4
    optimizer = torch.optim.Adam(unet.parameters(), lr=1e-2)
    for _ in range(15):
        t = torch.where(torch.rand(8) < 0.5, t_early, t_late)
        target = z * (t / 1000.0)[:, None, None, None]  # t-dependent target
        loss = torch.mean((unet(z, t) - target) ** 2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        assert relative_difference(unet(z, t_early), unet(z, t_late)) > 1e-2


def test_unet_is_deterministic_in_eval_mode() -> None:
    torch.manual_seed(0)
    unet = tiny_unet(dropout=0.5, attention_levels=[0, 1], layer_scale_init=1.0)
    z = torch.randn(2, 4, 8, 8)
    t = torch.tensor([3, 700])
    unet.eval()
    assert torch.equal(unet(z, t), unet(z, t))
    unet.train()  # dropout is live in training mode
    assert not torch.equal(unet(z, t), unet(z, t))


def test_gradients_reach_every_parameter() -> None:
    """No unused parameters (DDP without find_unused_parameters needs this), with the
    default layer scale 1e-6 and attention at both levels."""
    torch.manual_seed(0)
    unet = tiny_unet(attention_levels=[0, 1], dropout=0.1)
    z = torch.randn(2, 4, 8, 8)
    out = unet(z, torch.tensor([1, 500]))
    (out * torch.randn_like(out)).sum().backward()
    missing = [name for name, p in unet.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_unet_matches_under_channels_last_and_compiles_as_one_graph() -> None:
    """channels_last gives the same numbers; the forward traces as one graph (no graph
    break from data-dependent control flow) under torch.compile(fullgraph=True)."""
    torch.manual_seed(0)
    unet = tiny_unet(attention_levels=[1], layer_scale_init=1.0).eval()
    z = torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 600])
    reference = unet(z, t)

    last = tiny_unet(attention_levels=[1], layer_scale_init=1.0).eval()
    last.load_state_dict(unet.state_dict())
    last = last.to(memory_format=torch.channels_last)
    torch.testing.assert_close(last(z.to(memory_format=torch.channels_last), t), reference, rtol=1e-4, atol=1e-5)

    compiled = torch.compile(unet, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(z, t), reference)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("needs_gradient", [False, True])
@pytest.mark.parametrize("tokens", [1, SHORT_SEQUENCE, SHORT_SEQUENCE + 1, 64])
def test_attention_is_softmax_of_scaled_dot_products_on_both_sides_of_its_switch(tokens, needs_gradient, dtype,
                                                                                  monkeypatch) -> None:
    """softmax(q·kᵀ/√d)·v from its definition, written out or by the fused kernel — the
    fused kernel exactly where `attention` says: for training or beyond SHORT_SEQUENCE tokens."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, tokens, 8, dtype=torch.float64) for _ in range(3))
    weights = torch.exp(q @ k.transpose(-2, -1) / math.sqrt(8))
    expected = (weights / weights.sum(dim=-1, keepdim=True)) @ v
    fused_calls = []
    fused = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(unet_module.F, "scaled_dot_product_attention",
                        lambda *args: fused_calls.append(1) or fused(*args))
    out = attention(q.to(dtype).requires_grad_(needs_gradient), k.to(dtype), v.to(dtype))
    assert out.dtype == dtype
    tolerance = {"rtol": 1e-9, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 0.02, "atol": 0.02}
    torch.testing.assert_close(out.detach().double(), expected, **tolerance)
    assert len(fused_calls) == (needs_gradient or tokens > SHORT_SEQUENCE)


def test_convnext_block_computes_its_documented_formula() -> None:
    """out = x + γ ⊙ W₂·GELU(W₁·(LN(dwconv x)·(1 + scale(c)) + shift(c))), per pixel."""
    torch.manual_seed(0)
    block = ConvNeXtBlock(channels=8, cond_dim=12, mlp_ratio=2, layer_scale_init=0.7, dropout=0.0).double()
    torch.nn.init.normal_(block.layer_scale)
    x, cond = torch.randn(3, 8, 5, 5, dtype=torch.float64), torch.randn(3, 12, dtype=torch.float64)
    h = block.depthwise(x).permute(0, 2, 3, 1)
    mean, var = h.mean(dim=-1, keepdim=True), h.var(dim=-1, unbiased=False, keepdim=True)
    scale, shift = block.modulation(cond).chunk(2, dim=-1)
    h = (h - mean) / torch.sqrt(var + 1e-6) * (1 + scale[:, None, None]) + shift[:, None, None]
    h = block.contract(torch.nn.functional.gelu(block.expand(h))) * block.layer_scale
    torch.testing.assert_close(block(x, cond), x + h.permute(0, 3, 1, 2), rtol=1e-10, atol=1e-12)


def test_unet_stores_its_config() -> None:
    cfg = UNetConfig(base_channels=16)
    assert UNet(cfg).cfg is cfg


def test_self_conditioned_unet_stacks_its_z0_estimate_on_the_input() -> None:
    """With self_condition, conv_in takes 2·C channels; no estimate means zeros, and the
    estimate moves the output. A network built without it refuses an estimate."""
    torch.manual_seed(0)
    unet = tiny_unet(self_condition=True, layer_scale_init=1.0).eval()
    assert unet.self_conditioned and unet.conv_in.in_channels == 2 * unet.cfg.latent_channels
    z, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 600])
    torch.testing.assert_close(unet(z, t), unet(z, t, torch.zeros_like(z)))
    assert relative_difference(unet(z, t, torch.randn_like(z)), unet(z, t)) > 1e-2
    with pytest.raises(ValueError, match="shape of z_t"):
        unet(z, t, torch.zeros(2, 4, 4, 4))
    plain = tiny_unet()
    assert not plain.self_conditioned and plain.conv_in.in_channels == 4
    with pytest.raises(ValueError, match="without self_condition"):
        plain(z, t, torch.zeros_like(z))


def test_the_vae_compiles_with_dynamic_shapes():
    """torch.compile traces a changing batch or size as symbols; on a GPU, where training
    compiles by default, `randn(shape)` of a symbolic shape stopped the first update."""
    vae = tiny_vae([1, 2])
    compiled = torch.compile(vae, dynamic=True, backend="aot_eager")  # Dynamo's tracing is what failed
    torch.manual_seed(0)
    x_hat, posterior = compiled(torch.randn(3, 3, 16, 16))
    assert x_hat.shape == (3, 3, 16, 16) and posterior.mean.shape == (3, 4, 8, 8)


@pytest.mark.parametrize("gamma", [8.0, 3.5, 16.0])
def test_ema_keeps_of_the_initial_weights_the_closed_form_share(gamma):
    """With live weights 0 after an initial 1, the shadow after n updates is what the warm-up
    keeps of the start: Π_{k<n} (1 + k)/(γ + 2 + k) = n!·Γ(γ + 2)/Γ(γ + 2 + n) (docs/MATH.md, EMA)."""
    from ldm_cli.models.ema import EMA

    model = torch.nn.Linear(1, 1, bias=False).double()
    torch.nn.init.ones_(model.weight)
    ema = EMA(model, decay=0.99999, gamma=gamma)
    torch.nn.init.zeros_(model.weight)
    n = 50
    for _ in range(n):
        ema.update(model)
    expected = math.exp(math.lgamma(n + 1) + math.lgamma(gamma + 2) - math.lgamma(gamma + 2 + n))
    assert ema.shadow.weight.item() == pytest.approx(expected, rel=1e-12)
    assert ema.current_decay() == pytest.approx((1 + n) / (gamma + 2 + n))
