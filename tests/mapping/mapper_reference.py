"""Reference outputs of MiniGPT-5's voken mapper for sizes other than the golden folder's.

Builds fc / llm_to_t2i_mapping / t2i_decoder_prompt the way MiniGPT5_Model.__init__ does
(nn.Sequential(Linear, GELU, Linear) and nn.Transformer(batch_first=True, norm_first=True,
dropout=0.0)), with every parameter (LayerNorms included) randomised, and writes:
  <out>/stage1.ckpt      Lightning-style {"state_dict": ..., "epoch": ...}, plus an LLM key the
                         mapper must ignore
  <out>/expected.pt      {"input", "fc_out", "memory", "mapping_feature"}
Usage: mapper_reference.py OUT LLM_DIM SD_DIM NHEAD ENC_LAYERS DEC_LAYERS FFN PROMPT_LEN BATCH TOKENS SEED
Exit status 3 when torch is not importable.
"""
import sys
from collections import OrderedDict

try:
    import torch
    from torch import nn
except ImportError:
    sys.exit(3)


def main():
    out = sys.argv[1]
    llm_dim, sd_dim, nhead, enc_layers, dec_layers, ffn, prompt_len, batch, tokens, seed = map(int, sys.argv[2:12])
    torch.manual_seed(seed)
    prompt = nn.Parameter(torch.randn((1, prompt_len, sd_dim)))
    mapping = nn.Transformer(batch_first=True, norm_first=True, d_model=sd_dim, nhead=nhead,
                             num_encoder_layers=enc_layers, num_decoder_layers=dec_layers,
                             dim_feedforward=ffn, dropout=0.0)
    fc = nn.Sequential(nn.Linear(llm_dim, sd_dim), nn.GELU(), nn.Linear(sd_dim, sd_dim))
    with torch.no_grad():
        for name, p in mapping.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    mapping.eval()
    fc.eval()

    state = OrderedDict()
    state["t2i_decoder_prompt"] = prompt.detach().clone()
    state["model.llama_model.lm_head.weight"] = torch.randn(11, llm_dim)
    for name, p in mapping.state_dict().items():
        state["llm_to_t2i_mapping." + name] = p.clone()
    for name, p in fc.state_dict().items():
        state["fc." + name] = p.clone()
    torch.save({"state_dict": state, "epoch": 1, "global_step": 10}, out + "/stage1.ckpt")

    voken_hidden = torch.randn(batch, tokens, llm_dim)
    with torch.no_grad():
        fc_out = fc(voken_hidden)
        memory = mapping.encoder(fc_out)
        feature = mapping(src=fc_out, tgt=prompt.repeat(batch, 1, 1))
    torch.save({"input": voken_hidden, "fc_out": fc_out, "memory": memory, "mapping_feature": feature},
               out + "/expected.pt")


if __name__ == "__main__":
    main()
