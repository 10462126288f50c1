"""The lean UNet forward (engine.fastunet) against diffusers' own forward, and its traced runner."""

import numpy as np
import pytest
import torch

from sdstack.engine.fastunet import FastUNet, UNetRunner, unet_runner
from sdstack.engine.generate import generate
from sdstack.models.tiny import tiny_bundle
from sdstack.params import make_params


def inputs(unet, family, batch=2, h=16, w=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, h, w, generator=g)
    t = torch.tensor([999.0, 321.0][:batch])
    ctx = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g)
    added = None
    if family == "sdxl":
        pooled_dim = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        added = {"text_embeds": torch.randn(batch, pooled_dim, generator=g),
                 "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * batch)}
    return x, t, ctx, added


def reference(unet, x, t, ctx, added):
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("size", [(16, 16), (12, 20)])  # 12x20: not a multiple of 8, the upsamplers get sizes
def test_fast_forward_equals_diffusers(family, size):
    unet = tiny_bundle(family).unet.eval()
    fast = FastUNet.build(unet)
    assert fast is not None, f"{family}: the tiny layout should be one FastUNet reproduces"
    x, t, ctx, added = inputs(unet, family, h=size[0], w=size[1])
    want = reference(unet, x, t, ctx, added)
    with torch.no_grad():
        got = fast(x, t, ctx, added)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_traced_runner_equals_eager_and_follows_weight_changes():
    unet = tiny_bundle("sd1").unet.eval()
    runner = UNetRunner(unet)
    runner.eager_calls = 0  # trace at once
    x, t, ctx, _ = inputs(unet, "sd1")
    with torch.no_grad():
        runner.refresh()
        first = runner(x, t, ctx)
        assert len(runner.traces) == 1, "the call should have traced the fast forward"
        torch.testing.assert_close(first, reference(unet, x, t, ctx, None), rtol=1e-4, atol=1e-5)
        # an in-place weight change (as a LoRA merge makes it) must reach the trace after refresh(): directly read
        # weights and the fused q/k/v and time-embedding copies alike, without tracing again
        unet.conv_in.weight.add_(0.05)
        block = unet.up_blocks[-1].attentions[-1].transformer_blocks[0]
        block.attn1.to_v.weight.mul_(3)  # in the fused q/k/v weight
        block.attn2.to_v.weight.mul_(3)  # in the fused cross-attention k/v weight
        traces = dict(runner.traces)
        runner.refresh()
        assert runner.traces == traces, "an in-place change should not need a new trace"
        second = runner(x, t, ctx)
    want = reference(unet, x, t, ctx, None)
    torch.testing.assert_close(second, want, rtol=1e-4, atol=1e-5)
    assert (second - first).abs().max() > 1e-3


def test_runner_traces_each_shape_once():
    unet = tiny_bundle("sd2").unet.eval()
    runner = UNetRunner(unet)
    runner.eager_calls = 0
    with torch.no_grad():
        runner.refresh()
        for h, w in [(16, 16), (8, 24), (16, 16)]:
            x, t, ctx, _ = inputs(unet, "sd2", h=h, w=w)
            torch.testing.assert_close(runner(x, t, ctx), reference(unet, x, t, ctx, None), rtol=1e-4, atol=1e-5)
    assert len(runner.traces) == 2


def test_unsupported_layouts_run_the_models_own_forward():
    from diffusers.models.attention_processor import AttnProcessor

    class Doubled(AttnProcessor):  # a processor FastUNet does not know: its result must not be reproduced
        def __call__(self, attn, hidden_states, *args, **kwargs):
            return 2 * super().__call__(attn, hidden_states, *args, **kwargs)

    unet = tiny_bundle("sd1").unet.eval()
    unet.set_attn_processor(Doubled())
    assert FastUNet.build(unet) is None
    runner = UNetRunner(unet)
    x, t, ctx, _ = inputs(unet, "sd1")
    with torch.no_grad():
        torch.testing.assert_close(runner(x, t, ctx), reference(unet, x, t, ctx, None))
    # a forward hook (how adapters observe layers) also sends the call to the model's forward
    unet2 = tiny_bundle("sd1").unet.eval()
    unet2.mid_block.resnets[0].register_forward_hook(lambda m, i, o: o * 0)
    assert FastUNet.build(unet2) is None


def test_gradients_and_training_mode_use_the_models_forward():
    unet = tiny_bundle("sd1").unet
    runner = UNetRunner(unet)
    x, t, ctx, _ = inputs(unet, "sd1")
    unet.eval()
    assert not runner.usable(x)  # gradients on
    with torch.no_grad():
        assert runner.usable(x)
        unet.train()
        assert not runner.usable(x)


def test_fast_path_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("SDSTACK_FAST_UNET", "0")
    assert UNetRunner(tiny_bundle("sd1").unet).fast is None


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_generate_gives_the_same_image_with_and_without_the_fast_path(family, monkeypatch):
    params = make_params(prompt="a red star", negative_prompt="blue", steps=6, seed=5, batch_size=2,
                         width=64, height=64, n_iter=2)  # 12 UNet calls of one shape: 3 untraced, then traced
    fast_bundle = tiny_bundle(family)
    unet_runner(fast_bundle).eager_calls = 3
    fast = generate(fast_bundle, params).images
    assert unet_runner(fast_bundle).traces, "generation should have used the traced fast path"
    monkeypatch.setenv("SDSTACK_FAST_UNET", "0")
    plain_bundle = tiny_bundle(family)
    plain = generate(plain_bundle, params).images
    assert unet_runner(plain_bundle).fast is None
    for a, b in zip(fast, plain):
        assert np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max() <= 1


def test_adapters_and_hooks_added_after_the_runner_are_not_skipped():
    """A runner made on the base UNet (as DreamBooth's class images make it) must not keep running the base
    weights once LoRA layers are injected (as LoRA training then does), nor skip a hook registered later."""
    from peft import LoraConfig

    unet = tiny_bundle("sd1").unet.eval()
    runner = UNetRunner(unet)
    runner.eager_calls = 0
    x, t, ctx, _ = inputs(unet, "sd1")
    with torch.no_grad():
        base = runner(x, t, ctx)
        assert runner.traces
        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                    init_lora_weights=False))  # random B: the adapter changes the output
        runner.refresh()
        adapted = runner(x, t, ctx)
        want = reference(unet, x, t, ctx, None)
    assert runner.fast is None
    torch.testing.assert_close(adapted, want)
    assert (adapted - base).abs().max() > 1e-3

    unet2 = tiny_bundle("sd1").unet.eval()
    runner2 = UNetRunner(unet2)
    runner2.eager_calls = 0
    with torch.no_grad():
        runner2(x, t, ctx)
        unet2.conv_out.register_forward_hook(lambda m, i, o: o + 1.0)
        runner2.refresh()
        hooked = runner2(x, t, ctx)
        torch.testing.assert_close(hooked, reference(unet2, x, t, ctx, None))


def test_a_one_off_image_runs_untraced_and_repeated_shapes_get_traced():
    unet = tiny_bundle("sd1").unet.eval()
    runner = UNetRunner(unet)
    x, t, ctx, _ = inputs(unet, "sd1")
    with torch.no_grad():
        for _ in range(runner.eager_calls):
            torch.testing.assert_close(runner(x, t, ctx), reference(unet, x, t, ctx, None), rtol=1e-4, atol=1e-5)
        assert not runner.traces  # a 20-step image of one shape never pays for a trace
        torch.testing.assert_close(runner(x, t, ctx), reference(unet, x, t, ctx, None), rtol=1e-4, atol=1e-5)
    assert len(runner.traces) == 1


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_half_split_equals_the_whole_batch(family, two_threads):
    unet = tiny_bundle(family).unet.eval()
    x, t, ctx, added = inputs(unet, family)
    want = reference(unet, x, t, ctx, added)
    outs = {}
    for split in (True, False):
        runner = UNetRunner(unet, split=split)
        runner.eager_calls = 0
        with torch.no_grad():
            outs[split] = runner(x, t, ctx, added)
        batches = {sig[0][0][0] for sig in runner.traces}
        assert batches == ({1} if split else {2}), "the split run traces the half batch, the other the whole"
    for got in outs.values():
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_half_workers_keep_the_callers_thread_counts(two_threads):
    import threading

    from sdstack.engine.fastunet import HalfWorkers

    workers = HalfWorkers(2)
    assert torch.get_num_threads() == 2
    seen = []
    th = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    th.start()
    th.join()
    assert seen == [2], "a thread started later must keep ATen's default"
    counts = workers.run(lambda: torch.tensor(torch.get_num_threads()), (), ())
    assert [int(c) for c in counts] == [1, 1]

    def boom():
        raise ValueError("half failed")

    with pytest.raises(ValueError, match="half failed"):
        workers.run(boom, (), ())


def test_a_forked_child_makes_its_own_half_workers(two_threads):
    import multiprocessing

    from sdstack.engine import fastunet

    fastunet.half_workers(2)  # the parent's
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        # in the child the parent's worker threads do not exist: a run must not wait on them forever
        got = pool.apply_async(_child_half_run).get(timeout=60)
    assert got == [1, 1]


def _child_half_run():
    import torch as t

    from sdstack.engine import fastunet

    return [int(c) for c in fastunet.half_workers(2).run(lambda: t.tensor(t.get_num_threads()), (), ())]


def test_traces_are_bounded_and_a_replaced_tensor_is_traced_again(two_threads):
    """torch.jit keeps every traced function for the life of the process: many shapes and weight changes must not
    make one trace after another (a training run that did grew to 13 GB)."""
    from sdstack.engine.fastunet import MAX_TRACES

    unet = tiny_bundle("sd1").unet.eval()
    runner = UNetRunner(unet)
    runner.eager_calls = 0
    cu = torch.jit._state._python_cu
    before = len(cu.get_functions())
    with torch.no_grad():
        for step in range(3):
            unet.conv_out.bias.add_(0.01)  # in place: no new traces
            runner.refresh()
            for h, w in [(16, 16), (8, 16), (16, 8), (8, 8), (24, 8), (8, 24)]:
                x, t, ctx, _ = inputs(unet, "sd1", h=h, w=w)
                torch.testing.assert_close(runner(x, t, ctx), reference(unet, x, t, ctx, None), rtol=1e-4, atol=1e-5)
        assert len(runner.traces) == MAX_TRACES
        made = len(cu.get_functions()) - before
        assert made <= 2 * MAX_TRACES, f"{made} functions for {MAX_TRACES} traces"
        # a replaced tensor (new storage) is not one the traces read: they are dropped and made again
        unet.conv_out.weight = torch.nn.Parameter(unet.conv_out.weight.detach() * 0.5, requires_grad=False)
        runner.refresh()
        assert not runner.traces
        x, t, ctx, _ = inputs(unet, "sd1")
        torch.testing.assert_close(runner(x, t, ctx), reference(unet, x, t, ctx, None), rtol=1e-4, atol=1e-5)
        assert len(runner.traces) == 1


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_no_weight_is_copied_during_a_call(family):
    """Each convolution gets its weight in the layout it runs in: a weight that must be reordered at every call
    (an NCHW weight against channels-last-strided activations, as a transformer block's output once was) cost 8%
    of a shapes-v1 step. Counted with torch's profiler: no copy of a tensor shaped like a convolution weight."""
    from torch.profiler import ProfilerActivity, profile

    unet = tiny_bundle(family).unet.eval()
    fast = FastUNet.build(unet)
    fast.sync_fused()  # as the runner does before a sampling run
    x, t, ctx, _ = inputs(unet, family, batch=1)
    shapes = {tuple(m.weight.shape) for m in unet.modules() if isinstance(m, torch.nn.Conv2d)
              if m.weight.shape[-1] > 1}  # a 1x1 kernel's layouts coincide
    with torch.no_grad():
        fast(x, t, ctx, None)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            out = fast(x, t, ctx, None)
    copies = [e for e in prof.events() if e.name in ("aten::copy_", "aten::clone", "aten::contiguous")
              and e.input_shapes and tuple(e.input_shapes[0]) in shapes]
    assert not copies, f"{len(copies)} weight copies during one call, e.g. {copies[0].input_shapes[0]}"
    torch.testing.assert_close(out, reference(unet, x, t, ctx, None), rtol=1e-4, atol=1e-5)


def test_context_keys_and_values_are_projected_once_per_context():
    """The sampler hands the same context tensor at every step; the runner projects its cross-attention keys and
    values once, and again only for another tensor, an in-place change of it, or changed to_k / to_v weights."""
    unet = tiny_bundle("sd1").unet.eval()
    runner = UNetRunner(unet)
    runner.eager_calls = 1  # one untraced call, then traced ones: both must use the cache alike
    x, t, ctx, _ = inputs(unet, "sd1")
    projected = []
    original = runner.fast.context_kv
    runner.fast.context_kv = lambda c: projected.append(c) or original(c)
    with torch.no_grad():
        for _ in range(3):
            torch.testing.assert_close(runner(x, t, ctx), reference(unet, x, t, ctx, None), rtol=1e-4, atol=1e-5)
        assert len(projected) == 1
        unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k.weight.mul_(2.0)
        torch.testing.assert_close(runner(x, t, ctx), reference(unet, x, t, ctx, None), rtol=1e-4, atol=1e-5)
        assert len(projected) == 2, "a changed to_k weight must make new keys"
        ctx.mul_(0.5)
        torch.testing.assert_close(runner(x, t, ctx), reference(unet, x, t, ctx, None), rtol=1e-4, atol=1e-5)
        other = ctx.clone()
        torch.testing.assert_close(runner(x, t, other), reference(unet, x, t, other, None), rtol=1e-4, atol=1e-5)
        assert len(projected) == 4


def test_guidance_hands_the_same_context_tensor_at_every_step():
    from sdstack.engine.generate import generate as gen

    bundle = tiny_bundle("sd1")
    runner = unet_runner(bundle)
    seen = []
    original = runner.context_kv
    runner.context_kv = lambda c: seen.append(c) or original(c)
    gen(bundle, make_params(prompt="a red circle", steps=6, width=64, height=64, seed=3, cfg_scale=5.0,
                            sampler_name="Euler"))
    assert len(seen) == 6 and all(c is seen[0] for c in seen)
