"""Hugging Face transformers on attnkit: small randomly initialized Llama (GQA), Mistral (sliding
window), Gemma-2 (softcap) and BERT (bidirectional) models, with and without padding: outputs
at real (non-padded) positions match attn_implementation="eager"; on CUDA in bf16 (head dim 64),
within twice eager's own bf16 error against eager in fp32, forward and gradients. Skipped
without transformers (CI); run on the GPU machine (docs/python.md)."""
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from attnkit.integrations import transformers as ak_hf  # noqa: E402

ak_hf.register()


def _configs(head_dim=16, sliding=(5, 6)):
    from transformers import BertConfig, Gemma2Config, LlamaConfig, MistralConfig
    common = dict(vocab_size=97, hidden_size=4 * head_dim, intermediate_size=8 * head_dim,
                  num_hidden_layers=2, num_attention_heads=4)
    return {
        "llama": LlamaConfig(num_key_value_heads=2, head_dim=head_dim, **common),
        "mistral": MistralConfig(num_key_value_heads=2, head_dim=head_dim,
                                 sliding_window=sliding[0], **common),
        "gemma2": Gemma2Config(num_key_value_heads=2, head_dim=head_dim, sliding_window=sliding[1],
                               attn_logit_softcapping=3.0, final_logit_softcapping=None, **common),
        "bert": BertConfig(**common),
    }


def _inputs(name, cfg, b, n, padding, device="cpu"):
    ids = torch.randint(1, cfg.vocab_size, (b, n), device=device)
    mask = torch.ones(b, n, dtype=torch.long, device=device)
    if padding:  # right padding for BERT, left padding for the decoders (as in generation)
        if name == "bert":
            mask[1, 2 * n // 3:] = 0
        else:
            mask[1, :n // 3] = 0
    return ids, mask


@pytest.mark.parametrize("padding", [False, True])
@pytest.mark.parametrize("name", ["llama", "mistral", "gemma2", "bert"])
def test_matches_eager(name, padding):
    from transformers import AutoModel
    torch.manual_seed(0)
    cfg = _configs()[name]
    model = AutoModel.from_config(cfg, attn_implementation="eager").eval()
    ids, mask = _inputs(name, cfg, 2, 12, padding)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
        model.set_attn_implementation("attnkit")
        assert model.config._attn_implementation == "attnkit"
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    err = (out[real] - ref[real]).norm() / ref[real].norm()
    assert err < 1e-4, f"{name} padding={padding}: rel err {err:.2e}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("padding", [False, True])
@pytest.mark.parametrize("name", ["llama", "mistral", "gemma2", "bert"])
def test_cuda_bf16_matches_eager(name, padding):
    """The model in bf16 on CUDA with attnkit's CUDA kernels (head dim 64, windows 40 and 48 over
    100 tokens): its outputs at real positions and the gradient of the first layer's query
    weights are within twice (plus a floor) the error of eager attention in bf16, both against
    eager in fp32."""
    from transformers import AutoModel
    torch.manual_seed(0)
    cfg = _configs(head_dim=64, sliding=(40, 48))[name]
    # eval(): no dropout (attnkit refuses attention dropout by name); gradients still flow.
    ref_model = AutoModel.from_config(cfg, attn_implementation="eager").cuda().eval()
    ids, mask = _inputs(name, cfg, 2, 100, padding, device="cuda")
    real = mask.bool()

    def run(model):
        model.zero_grad()
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        out[real].square().mean().backward()
        layer = model.encoder.layer[0].attention.self if name == "bert" else model.layers[0].self_attn
        w = layer.query if name == "bert" else layer.q_proj
        return out[real].detach(), w.weight.grad.float()

    ref_out, ref_grad = run(ref_model)
    model16 = AutoModel.from_config(cfg, attn_implementation="eager").cuda()
    model16.load_state_dict(ref_model.state_dict())
    model16 = model16.to(torch.bfloat16).eval()
    eager_out, eager_grad = run(model16)
    model16.set_attn_implementation("attnkit")
    out, grad = run(model16)

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    assert rel(out, ref_out) <= 2 * rel(eager_out, ref_out) + 1e-3, (
        name, padding, rel(out, ref_out), rel(eager_out, ref_out))
    assert rel(grad, ref_grad) <= 2 * rel(eager_grad, ref_grad) + 1e-3, (
        name, padding, rel(grad, ref_grad), rel(eager_grad, ref_grad))
