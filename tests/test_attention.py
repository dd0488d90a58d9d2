import pytest
import torch

from ldmground.errors import LdmGroundError
from ldmground.method.attention import AttentionRecorder, PhraseRow, cross_attention_layers


def _inputs(unet, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, unet.config.in_channels, 16, 16, generator=g)
    ctx = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g)
    return x, ctx


def test_layer_order_is_forward_order(tiny_pipe):
    unet = tiny_pipe.unet
    names = cross_attention_layers(unet)
    assert len(names) == 11
    modules = dict(unet.named_modules())
    called = []
    hooks = [
        modules[n.rsplit(".processor", 1)[0]].register_forward_hook(lambda m, i, o, n=n: called.append(n))
        for n in names
    ]
    x, ctx = _inputs(unet, 1)
    with torch.no_grad():
        unet(x, 10, encoder_hidden_states=ctx)
    for h in hooks:
        h.remove()
    assert called == names
    # attn_processors' own order is not the forward order (mid block is registered last)
    registered = [n for n in unet.attn_processors if n.endswith("attn2.processor")]
    assert registered != names


def test_recording_does_not_change_output_and_restores(tiny_pipe):
    unet = tiny_pipe.unet
    x, ctx = _inputs(unet)
    before = dict(unet.attn_processors)
    with torch.no_grad():
        ref = unet(x, 100, encoder_hidden_states=ctx).sample
        with AttentionRecorder(unet, layers=[3, 4, 6, 7]) as rec:
            rec.begin([PhraseRow(1, [1, 2, 3])], (16, 16))
            rec.active, rec.step = True, 0
            out = unet(x, 100, encoder_hidden_states=ctx).sample
    assert (out - ref).abs().max().item() <= 1e-5
    assert unet.attn_processors == before
    shapes = rec.store.counts[0]
    assert shapes == {(4, 4): 4}  # layers 3, 4, 6, 7 all at the 4x4 level of a 16x16 latent


def test_processors_restored_on_exception(tiny_pipe):
    unet = tiny_pipe.unet
    before = dict(unet.attn_processors)
    with pytest.raises(RuntimeError, match="boom"):
        with AttentionRecorder(unet, layers=[0]):
            assert unet.attn_processors != before
            raise RuntimeError("boom")
    assert unet.attn_processors == before


def test_recorded_map_equals_manual_softmax(tiny_pipe):
    unet = tiny_pipe.unet
    x, ctx = _inputs(unet)
    name = cross_attention_layers(unet)[0]
    attn = dict(unet.named_modules())[name.rsplit(".processor", 1)[0]]
    captured = {}
    hook = attn.register_forward_pre_hook(lambda m, a, kw: captured.update(h=a[0]), with_kwargs=True)
    with torch.no_grad(), AttentionRecorder(unet, layers=[0], normalize=False, keep_maps=True) as rec:
        rec.begin([PhraseRow(1, [2, 5])], (16, 16))
        rec.active, rec.step = True, 7
        unet(x, 100, encoder_hidden_states=ctx)
    hook.remove()
    h = captured["h"][1:2]
    with torch.no_grad():
        q = attn.to_q(h).view(1, -1, attn.heads, attn.inner_dim // attn.heads).transpose(1, 2)
        k = attn.to_k(ctx[1:2]).view(1, -1, attn.heads, attn.inner_dim // attn.heads).transpose(1, 2)
        probs = (q @ k.transpose(-1, -2) / (q.shape[-1] ** 0.5)).softmax(-1).mean(1)[0]
    expected = probs[:, [2, 5]].T.reshape(2, 8, 8)
    got = rec.store.maps[0][(0, 7)]
    assert torch.allclose(got, expected, atol=1e-6)
    assert rec.store.sums[0][(8, 8)].allclose(expected.mean(0), atol=1e-6)


def test_inactive_recorder_records_nothing(tiny_pipe):
    unet = tiny_pipe.unet
    x, ctx = _inputs(unet)
    with torch.no_grad(), AttentionRecorder(unet, layers=None) as rec:
        rec.begin([PhraseRow(1, [1])], (16, 16))
        unet(x, 100, encoder_hidden_states=ctx)
    assert rec.store.counts[0] == {}


def test_bad_layer_index(tiny_pipe):
    with pytest.raises(LdmGroundError, match="out of range"):
        AttentionRecorder(tiny_pipe.unet, layers=[11])
