"""The model core: unified attention formula, its instances, and the DenseUNet."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from napari_jointattn.model import (
    ATTENTION_TYPES,
    AttentionKey,
    DenseUNet,
    DenseUNetConfig,
    JointAttention,
    PointwiseAttention,
    SelfAttention,
    fused_attention,
    make_attention,
)

INSTANCES = [
    ("pointwise", {}),
    ("self", {}),
    ("joint", {"joint_form": "mix"}),
    ("joint", {"joint_form": "gated"}),
]
IDS = ["pointwise", "self", "joint-mix", "joint-gated"]


def _module(kind, kw, channels=12, gamma=0.7, seed=0):
    torch.manual_seed(seed)
    mod = make_attention(kind, channels, value_dim=6, key_dim=5, **kw).double()
    with torch.no_grad():
        mod.gamma.fill_(gamma)
    return mod


@pytest.mark.parametrize("kind,kw", INSTANCES, ids=IDS)
def test_fast_path_equals_unified_formula(kind, kw):
    """forward (fused SDPA) == x + gamma W_z (A g(x)) with A built explicitly."""
    mod = _module(kind, kw)
    x = torch.randn(2, 12, 7, 9, dtype=torch.float64)
    fast = mod(x)
    explicit = mod.forward_explicit(x)
    assert fast.shape == x.shape
    torch.testing.assert_close(fast, explicit, rtol=1e-9, atol=1e-9)
    # and the module really does something once gamma != 0
    assert (fast - x).abs().max() > 1e-3


def test_explicit_matrices_have_the_documented_structure():
    x = torch.randn(1, 12, 5, 6, dtype=torch.float64)
    pw = _module("pointwise", {})
    a = pw.explicit_matrix(x)[0]
    assert torch.count_nonzero(a - torch.diag(torch.diagonal(a))) == 0  # diagonal
    sa = _module("self", {})
    torch.testing.assert_close(sa.explicit_matrix(x).sum(-1), torch.ones(1, 30, dtype=x.dtype))
    gated = _module("joint", {"joint_form": "gated"})
    torch.testing.assert_close(
        gated.explicit_matrix(x).sum(-1), torch.ones(1, 30, dtype=x.dtype)
    )
    mix = _module("joint", {"joint_form": "mix"})
    a = mix.explicit_matrix(x)[0]
    lam = mix.mix_map(x).flatten()
    m = mix.gate_map(x).flatten()
    # rows sum to (1 - lam) m + lam: local share plus a softmax row of mass lam
    torch.testing.assert_close(a.sum(-1), (1 - lam) * m + lam)


@pytest.mark.parametrize("kind,kw", INSTANCES, ids=IDS)
def test_fresh_module_is_identity(kind, kw):
    torch.manual_seed(1)
    mod = make_attention(kind, 16, **kw)
    x = torch.randn(1, 16, 8, 8)
    assert torch.equal(mod(x), x)


@pytest.mark.parametrize("kind,kw", INSTANCES, ids=IDS)
def test_gradients_reach_every_parameter(kind, kw):
    mod = _module(kind, kw).float()
    x = torch.randn(2, 12, 6, 6, requires_grad=True)
    mod(x).square().sum().backward()
    for name, p in mod.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # at initialisation (gamma = 0) gamma itself still learns
    fresh = make_attention(kind, 12, **kw)
    fresh(torch.randn(1, 12, 6, 6)).square().sum().backward()
    assert fresh.gamma.grad.abs().item() > 0


def test_network_gradients_reach_every_parameter():
    torch.manual_seed(0)
    net = DenseUNet(DenseUNetConfig(in_channels=2, num_classes=3, dropout=0.0))
    with torch.no_grad():
        for _, mod in net.attention_modules():
            mod.gamma.fill_(0.5)
    net(torch.randn(2, 2, 64, 64)).logsumexp(1).sum().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


@pytest.mark.parametrize("kind,kw", INSTANCES[1:], ids=IDS[1:])
def test_attention_row_matches_explicit_matrix_row(kind, kw):
    mod = _module(kind, kw)
    x = torch.randn(1, 12, 6, 7, dtype=torch.float64)
    idx = 17
    row = mod.attention_row(x, idx)
    assert row.shape == (1, 6, 7)
    torch.testing.assert_close(row.sum(), torch.tensor(1.0, dtype=x.dtype))
    if kind == "joint" and kw["joint_form"] == "mix":
        expected = torch.softmax(mod.scores(x), -1)[0, idx]  # the global part
    else:
        expected = mod.explicit_matrix(x)[0, idx]
    torch.testing.assert_close(row.flatten(), expected)


def test_pointwise_has_no_global_row():
    with pytest.raises(ValueError, match="no global attention row"):
        PointwiseAttention(8).attention_row(torch.randn(1, 8, 4, 4), 0)


def test_fused_attention_pads_to_equal_head_dims():
    torch.manual_seed(0)
    q, k = torch.randn(2, 50, 4), torch.randn(2, 50, 4)
    v = torch.randn(2, 50, 7)
    expected = torch.softmax(q @ k.transpose(1, 2) * 0.3, -1) @ v
    torch.testing.assert_close(fused_attention(q, k, v, 0.3), expected, rtol=1e-5, atol=1e-5)
    q8, k8 = torch.randn(1, 20, 8), torch.randn(1, 20, 8)
    v3 = torch.randn(1, 20, 3)
    expected = torch.softmax(q8 @ k8.transpose(1, 2) * 0.5, -1) @ v3
    torch.testing.assert_close(fused_attention(q8, k8, v3, 0.5), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attention", ["none", "pointwise", "self", "joint"])
@pytest.mark.parametrize("shape,channels,classes", [((37, 53), 1, 2), ((64, 31), 3, 4), ((1, 1), 2, 3)])
def test_network_output_shapes(attention, shape, channels, classes):
    net = DenseUNet(in_channels=channels, num_classes=classes, attention=attention).eval()
    with torch.no_grad():
        y = net(torch.randn(2, channels, *shape))
    assert y.shape == (2, classes, *shape)
    assert torch.isfinite(y).all()


def test_config_without_extra_output_channels_reads_old_files():
    """Files written when configs had ``aux_channels`` (always 0, as in the presets) still load."""
    old = {**DenseUNetConfig().to_dict(), "aux_channels": 0}
    assert "aux_channels" not in DenseUNetConfig().to_dict()
    assert DenseUNetConfig.from_dict(old) == DenseUNetConfig()
    with pytest.raises(ValueError, match="extra output channels are not supported"):
        DenseUNetConfig.from_dict({**old, "aux_channels": 1})
    net = DenseUNet(num_classes=3).eval()
    with torch.no_grad():
        assert net(torch.randn(1, 1, 40, 40)).shape == (1, 3, 40, 40)


def test_attention_keys_name_modules_and_maps():
    key = AttentionKey("joint", 16)
    assert key.name == str(key) == "joint 1/16"
    assert key.with_map("mix").name == "joint 1/16 mix"
    assert key.with_map("mix").module == key and hash(key.with_map("mix").module) == hash(key)
    net = DenseUNet(attention="joint", joint_form="mix")
    assert [k for k, _ in net.attention_keys()] == [AttentionKey("joint", s) for s in (8, 16, 32)]
    assert [k.name for k in net.map_keys()] == [
        f"joint 1/{s} {m}" for s in (8, 16, 32) for m in ("pointwise", "mix", "effect")]
    assert [k.map for k in DenseUNet(joint_form="gated").map_keys()] == ["pointwise", "effect"] * 3
    assert [k.map for k in DenseUNet(attention="self").map_keys()] == ["effect"] * 3
    assert [k.name for k in DenseUNet(attention="pointwise", attention_levels=(3,)).map_keys()] == [
        "pointwise 1/32 pointwise", "pointwise 1/32 effect"]


def test_a_new_attention_variant_is_one_class_and_one_registry_line(monkeypatch):
    class Gate2(PointwiseAttention):
        kind = "gate2"

    monkeypatch.setitem(ATTENTION_TYPES, "gate2", Gate2)
    mod = make_attention("gate2", 12, value_dim=6)
    assert isinstance(mod, Gate2) and mod.map_names == ("pointwise",) and not mod.has_global_row
    with pytest.raises(ValueError, match="attention kind must be one of"):
        make_attention("magic", 12)


def test_wrong_channel_count_is_a_clear_error():
    with pytest.raises(ValueError, match=r"expected input \(B, 3, H, W\)"):
        DenseUNet(in_channels=3)(torch.randn(1, 1, 32, 32))


def test_variants_differ_only_in_attention():
    nets = {a: DenseUNet(attention=a) for a in ["none", "pointwise", "self", "joint"]}
    names = {a: [n for n, _ in net.attention_modules()] for a, net in nets.items()}
    assert names["none"] == []
    assert names["joint"] == ["joint 1/8", "joint 1/16", "joint 1/32"]
    assert names["self"] == ["self 1/8", "self 1/16", "self 1/32"]
    base = {k for k in nets["none"].state_dict() if not k.startswith("attention.")}
    for net in nets.values():
        rest = {k for k in net.state_dict() if not k.startswith("attention.")}
        assert rest == base


def test_fresh_network_output_independent_of_attention_variant():
    """Zero-initialised gammas: every variant starts as the plain DenseUNet."""
    x = torch.randn(1, 1, 48, 48)
    ref = DenseUNet(attention="none").eval()
    for attention in ["pointwise", "self", "joint"]:
        net = DenseUNet(attention=attention).eval()
        missing, unexpected = net.load_state_dict(ref.state_dict(), strict=False)
        assert missing and all(k.startswith("attention.") for k in missing)
        assert not unexpected
        with torch.no_grad():
            torch.testing.assert_close(net(x), ref(x))


@pytest.mark.parametrize("form", ["mix", "gated"])
def test_inspect_maps_shapes_and_rows(form):
    torch.manual_seed(0)
    net = DenseUNet(joint_form=form).eval()
    with torch.no_grad():
        for _, mod in net.attention_modules():
            mod.gamma.fill_(0.3)
    x = torch.randn(1, 1, 100, 70)
    logits, maps = net.inspect(x, query=(50, 20))
    with torch.no_grad():
        torch.testing.assert_close(logits, net(x))  # inspection does not change results
    assert set(maps) == {"joint 1/8", "joint 1/16", "joint 1/32"}
    for name, stride in [("joint 1/8", 8), ("joint 1/16", 16), ("joint 1/32", 32)]:
        expected = (1, -(-100 // stride), -(-70 // stride))
        assert maps[name]["pointwise"].shape == expected
        assert maps[name]["row"].shape == expected
        assert ("mix" in maps[name]) == (form == "mix")
        pw = maps[name]["pointwise"]
        assert ((pw > 0) & (pw < 1)).all()
    # the row is normalised over the padded feature map (100 x 70 is padded to
    # 128 x 96): where the map is cropped, the padding cells took some of the mass
    for name, stride in [("joint 1/8", 8), ("joint 1/16", 16), ("joint 1/32", 32)]:
        cropped = (-(-100 // stride), -(-70 // stride)) != (128 // stride, 96 // stride)
        total = maps[name]["row"].sum().item()
        assert total < 1 - 1e-3 if cropped else total == pytest.approx(1, abs=1e-5)
    # without padding (sides multiples of 32) the row covers the whole map and sums to 1
    _, unpadded = net.inspect(torch.randn(1, 1, 64, 96), query=(10, 90))
    for name in unpadded:
        assert unpadded[name]["row"].sum().item() == pytest.approx(1, abs=1e-5)


def test_inspect_row_depends_on_query():
    torch.manual_seed(0)
    net = DenseUNet().eval()
    x = torch.rand(1, 1, 64, 64)
    _, a = net.inspect(x, query=(0, 0))
    _, b = net.inspect(x, query=(63, 63))
    assert not torch.allclose(a["joint 1/8"]["row"], b["joint 1/8"]["row"])


def test_fast_path_never_calls_inspection_code(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("inspection path used in the fast path")

    for cls in (SelfAttention, JointAttention, PointwiseAttention):
        for name in ("explicit_matrix", "attention_row", "maps", "scores", "scores_row"):
            if hasattr(cls, name):
                monkeypatch.setattr(cls, name, forbidden)
    for attention in ["pointwise", "self", "joint"]:
        for form in ["mix", "gated"]:
            net = DenseUNet(attention=attention, joint_form=form)
            net(torch.randn(1, 1, 64, 64)).sum().backward()


def test_config_roundtrip_and_validation():
    cfg = DenseUNetConfig(in_channels=3, num_classes=4, attention="self")
    again = DenseUNetConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    with pytest.raises(ValueError, match="attention must be one of"):
        DenseUNetConfig(attention="magic")
    with pytest.raises(ValueError, match="unknown model config keys"):
        DenseUNetConfig.from_dict({"bogus": 1})
    with pytest.raises(ValueError, match="num_classes"):
        DenseUNetConfig(num_classes=0)
    large = DenseUNet(DenseUNetConfig.large())
    small = DenseUNet()
    assert sum(p.numel() for p in large.parameters()) > 5 * sum(
        p.numel() for p in small.parameters()
    )


MEMORY_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from napari_jointattn.model import make_attention

    def peak_kib():  # this process's own peak RSS; ru_maxrss would carry the parent's over exec
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))

    torch.set_num_threads(2)
    kind, form, grad = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    mod = make_attention(kind, 32, value_dim=16, key_dim=16, joint_form=form)
    x = torch.randn(1, 32, 192, 192, requires_grad=grad)  # N = 36864
    before = peak_kib()
    with torch.set_grad_enabled(grad):
        y = mod(x)
        if grad:
            y.sum().backward()
    after = peak_kib()
    print((after - before) / 1024)
    """
)


@pytest.mark.parametrize(
    "kind,form,grad",
    [("self", "mix", "0"), ("joint", "mix", "0"), ("joint", "gated", "0"),
     # the backward pass: about 2 minutes on 2 busy cores
     pytest.param("joint", "mix", "1", marks=pytest.mark.slow)],
)
def test_fast_path_memory_far_below_n_squared(kind, form, grad):
    """At 192x192 features one N x N float32 matrix is 5.1 GiB; we allow 0.5 GiB."""
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, kind, form, grad],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    grown_mib = float(out.stdout.strip().splitlines()[-1])
    n = 192 * 192
    assert grown_mib < 0.1 * n * n * 4 / 2**20, f"{grown_mib:.0f} MiB"


def test_head_layers_add_full_resolution_capacity():
    from napari_jointattn.model import DenseUNet, DenseUNetConfig

    one = DenseUNet(num_classes=3)
    three = DenseUNet(num_classes=3, head_channels=16, head_layers=3)
    convs = [m for m in three.refine if isinstance(m, torch.nn.Conv2d)]
    assert [c.kernel_size for c in convs] == [(3, 3)] * 3 + [(1, 1)]
    # the default keeps the layout of files saved before head_layers existed
    assert list(one.refine.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    x = torch.randn(1, 1, 70, 90)
    assert three(x).shape == (1, 3, 70, 90)
    assert DenseUNetConfig.from_dict({k: v for k, v in one.config.to_dict().items() if k != "head_layers"}).head_layers == 1
    with pytest.raises(ValueError, match="head_layers"):
        DenseUNetConfig(head_layers=0)


def test_knocked_out_modules_pass_their_input_through_and_the_effect_map_shows_the_change():
    torch.manual_seed(0)
    net = DenseUNet(attention="joint", joint_form="mix").eval()
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        for module in net.attention.values():
            module.gamma.fill_(0.5)  # a module that changes its input
        base, maps = net.inspect(x)
        with net.knocked_out(["joint 1/16"]):
            one_off = net(x)
            _, maps_off = net.inspect(x)
        assert all(m.enabled for m in net.attention.values())  # restored
        with net.knocked_out():
            none = net(x)
        for module in net.attention.values():
            module.gamma.zero_()
        zero = net(x)
    assert not torch.allclose(base, one_off) and not torch.allclose(one_off, none)
    assert torch.allclose(none, zero, atol=1e-6)  # all knocked out == gamma 0: the identity
    assert maps["joint 1/16"]["effect"].min() > 0
    assert torch.count_nonzero(maps_off["joint 1/16"]["effect"]) == 0  # knocked out: changed nothing
    assert maps_off["joint 1/8"]["effect"].min() > 0
    with pytest.raises(ValueError, match="no attention module"):
        with net.knocked_out(["joint 1/4"]):
            pass


@pytest.mark.parametrize("form", ["mix", "gated"])
def test_one_branch_alone_is_the_branch_formula_and_mix_at_its_limits(form):
    torch.manual_seed(1)
    net = DenseUNet(attention="joint", joint_form=form).eval()
    key, module = net.attention_keys()[0]
    x = torch.randn(2, module.channels, 12, 10, dtype=torch.float64)
    module.double()
    with torch.no_grad():
        v = module.value(x).flatten(2).transpose(1, 2)  # (B, N, C)
        gate = module.gate_map(x).flatten(1).unsqueeze(-1)
        soft = torch.softmax(module.scores(x), dim=-1)
        with net.branch_only("pointwise"):
            pw = module.aggregate(x)
        with net.branch_only("self"):
            sa = module.aggregate(x)
        both = module.aggregate(x)
    assert module.branch is None  # restored
    assert torch.allclose(pw.flatten(2).transpose(1, 2), gate * v, atol=1e-9)
    assert torch.allclose(sa.flatten(2).transpose(1, 2), torch.bmm(soft, v), atol=1e-9)
    assert not torch.allclose(both, pw) and not torch.allclose(both, sa)
    if form == "mix":  # lam -> 0 is the point-wise branch, lam -> 1 the self-attention one
        with torch.no_grad():
            for bias, want in ((-60.0, pw), (60.0, sa)):
                module.mix.weight.zero_()
                module.mix.bias.fill_(bias)
                assert torch.allclose(module.aggregate(x), want, atol=1e-9)
    with pytest.raises(ValueError, match="branch"):
        with net.branch_only("both"):
            pass
    with pytest.raises(ValueError, match="no joint"):
        with DenseUNet(attention="pointwise").branch_only("self"):
            pass
