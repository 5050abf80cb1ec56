"""Hugging Face transformers on attnkit: small randomly initialized Llama (GQA), Mistral (sliding
window), Gemma-2 (softcap) and BERT (bidirectional) models, with and without padding: outputs
at real (non-padded) positions match attn_implementation="eager". Skipped without transformers
(CI); run on the GPU machine (docs/python.md)."""
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from attnkit.integrations import transformers as ak_hf  # noqa: E402

ak_hf.register()


def _configs():
    from transformers import BertConfig, Gemma2Config, LlamaConfig, MistralConfig
    common = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4)
    return {
        "llama": LlamaConfig(num_key_value_heads=2, head_dim=16, **common),
        "mistral": MistralConfig(num_key_value_heads=2, head_dim=16, sliding_window=5, **common),
        "gemma2": Gemma2Config(num_key_value_heads=2, head_dim=16, sliding_window=6,
                               attn_logit_softcapping=3.0, final_logit_softcapping=None, **common),
        "bert": BertConfig(**common),
    }


@pytest.mark.parametrize("padding", [False, True])
@pytest.mark.parametrize("name", ["llama", "mistral", "gemma2", "bert"])
def test_matches_eager(name, padding):
    from transformers import AutoModel
    torch.manual_seed(0)
    cfg = _configs()[name]
    model = AutoModel.from_config(cfg, attn_implementation="eager").eval()
    b, n = 2, 12
    ids = torch.randint(1, cfg.vocab_size, (b, n))
    mask = torch.ones(b, n, dtype=torch.long)
    if padding:  # right padding for BERT, left padding for the decoders (as in generation)
        if name == "bert":
            mask[1, 8:] = 0
        else:
            mask[1, :4] = 0
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
        model.set_attn_implementation("attnkit")
        assert model.config._attn_implementation == "attnkit"
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    err = (out[real] - ref[real]).norm() / ref[real].norm()
    assert err < 1e-4, f"{name} padding={padding}: rel err {err:.2e}"
