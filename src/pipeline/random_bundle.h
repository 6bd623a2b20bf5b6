// A MiniGPT-5 bundle with random weights, written in exactly the files and formats real users
// download (see docs/bundle.md): for the demo (`voken demo`), end-to-end tests and benchmarks
// when no real weights are present. Everything it writes is labelled "random_weights": true.
//
//   <dir>/bundle.json                        the manifest ("random_weights": true)
//   <dir>/vicuna-7b/                         HF LLaMA: config.json, model.safetensors (or shards of
//                                            at most `shard_bytes` + model.safetensors.index.json),
//                                            tokenizer.model (text/sentencepiece_writer.h),
//                                            added_tokens.json, special_tokens_map.json,
//                                            tokenizer_config.json ([IMG0]..[IMG7], <ImageHere>
//                                            right after the sentencepiece pieces)
//   <dir>/eva_vit_g.pth                      bare state dict, float16, one block more than built
//   <dir>/blip2_pretrained_flant5xxl.pth     {"model": ln_vision, Qformer.bert (with the unused
//                                            text branch), query_tokens, t5_proj}
//   <dir>/prerained_minigpt4_7b.pth          {"model": llama_proj}
//   <dir>/vision_config.json                 ImageEncoderConfig JSON (only for non-default dims)
//   <dir>/minigpt5_stage1.ckpt               Lightning checkpoint: fc, llm_to_t2i_mapping,
//                                            t2i_decoder_prompt, embed_tokens/lm_head with the
//                                            added rows (+ epoch, callbacks, hyper_parameters with
//                                            an argparse.Namespace, ... like the real one)
//   <dir>/minigpt5_stage2.ckpt               PEFT LoRA (r 8, q_proj/v_proj, ".default"),
//                                            modules_to_save embed_tokens/lm_head, the mapping
//   <dir>/stable-diffusion-2-1-base/         diffusers: model_index.json, unet/, vae/ (config.json
//                                            + diffusion_pytorch_model.safetensors; the VAE with
//                                            the deprecated attention names of the real SD 2.1
//                                            file, or the current ones), scheduler/ (PNDM as SD 2.1)
//
// Weights are N(0, 0.02) for transformer matrices (the output projections of each LLaMA layer
// scaled by 1/sqrt(2 layers), as GPT-2 initialises residual branches), ones (+ small noise
// elsewhere) for norms, small biases, 1/sqrt(fan_in) for the diffusion models' convolutions and
// linears; so activations stay finite at every shape. Every file has its own generator seeded
// from (seed, file), so a bundle is the same for the same seed and shape, whatever else changes.
//
// Text generation on random weights. The LLM is built so that sampling behaves usefully:
//  - the token embeddings are N(0, 1) with channel 0 held at a constant 1 ("bias channel"); no
//    layer writes channel 0 (row 0 of every o_proj and down_proj is zero), so after the final
//    RMSNorm channel 0 is about 1 at every generated position, and lm_head column 0 acts as a
//    per-token logit bias. Other lm_head entries are N(0, 1/hidden): logits have spread ~1, so
//    top-k/top-p sampling is not degenerate;
//  - [IMG0]'s bias is `img0_logit_bias` (3.2, about 3 standard deviations of the other logits,
//    so it survives top_k 50): with upstream's sampling (top_p 0.9, top_k 50, repetition_penalty
//    2 over the generated ids, the forced vokens included) and the tiny shape, an [IMG0] comes
//    within 60 tokens for all of 12 seeds and a second one (its bias halved by the penalty) within
//    256 tokens for 7 of 12 (tests/pipeline/test_random_bundle.cpp measures this);
//    [IMG1]..[IMG7] and <ImageHere> get -`img0_logit_bias` (rarely sampled on their own), and
//    so do <unk>, <s> and the 256 byte pieces (random bytes would decode to U+FFFD);
//  - the stop marker: "▁###" and "##" get `stop_logit_bias` (1.4; 7 of the 12 responses of that
//    test end on "###" within 256 tokens; 1.0 gave none, 1.8 all of them). In this vocabulary,
//    as in LLaMA's, "###" after a space is the single piece "▁###" and otherwise "##" "#": the
//    pipeline should derive its stop sequences from the tokenizer ([id("▁###")] and
//    [id("##"), id("#")], which are upstream's hard-coded [835] and [2277, 29937] for the real
//    LLaMA vocabulary), not hard-code ids.
// The rates hold for the tiny shape; at the real shape the residual stream is larger relative to
// the bias channel, so the biases act about half as strongly.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace voken::pipeline {

struct RandomBundleShape {
  struct Llm {
    int64_t vocab_size = 1009;  // the tokenizer's pieces + the 9 added tokens (base = vocab - 9)
    int64_t hidden_size = 64;
    int64_t intermediate_size = 172;
    int64_t num_layers = 2;
    int64_t num_heads = 4;
    int64_t num_kv_heads = 4;
    int64_t context = 1024;        // max_position_embeddings
    double img0_logit_bias = 3.2;  // see the header comment
    double stop_logit_bias = 1.4;
    int64_t lora_rank = 8;
  } llm;
  struct Vision {
    int64_t img_size = 224;
    int64_t patch_size = 14;
    int64_t width = 48;
    int64_t depth = 3;  // blocks built; the file holds depth + 1 like the real eva_vit_g.pth
    int64_t num_heads = 4;
    int64_t mlp_hidden = 209;
  } vision;
  struct QFormer {
    int64_t hidden_size = 32;
    int64_t num_layers = 4;
    int64_t num_heads = 4;
    int64_t intermediate_size = 64;
    int64_t num_queries = 32;
    int64_t cross_attention_freq = 2;
    int64_t text_vocab_size = 64;  // the unused text branch's word embeddings (bert-base: 30522)
    int64_t t5_width = 40;         // the unused t5_proj's rows (Flan-T5-XXL: 4096)
  } qformer;
  struct Mapper {
    int64_t sd_dim = 32;  // must equal unet.cross_attention_dim
    int64_t encoder_layers = 4;
    int64_t decoder_layers = 4;
    int64_t ffn_dim = 128;  // nn.Transformer's dim_feedforward (upstream: 4 * sd_dim)
    int64_t nhead = 8;
    int64_t prompt_len = 77;
  } mapper;
  struct UNet {
    std::vector<int64_t> block_out_channels = {32, 32, 64, 64};
    int64_t layers_per_block = 1;
    std::vector<int64_t> attention_head_dim = {2, 4, 4, 8};
    int64_t cross_attention_dim = 32;
    bool use_linear_projection = true;
    int64_t sample_size = 8;
    int64_t norm_num_groups = 8;
    // false: the first (full-resolution) level has no attention (DownBlock2D / UpBlock2D), which
    // makes the tiny UNet ~10x cheaper at 512x512 (attention over 64x64 latents dominates it).
    bool full_resolution_attention = false;
  } unet;
  struct Vae {
    std::vector<int64_t> block_out_channels = {16, 32, 32, 32};
    int64_t layers_per_block = 1;
    int64_t norm_num_groups = 8;
    int64_t latent_channels = 4;
    int64_t sample_size = 64;
    bool deprecated_attention_names = true;  // query/key/value/proj_attn, as the real SD 2.1 VAE file
  } vae;
  // Floating dtype on disk: kFloat, kBFloat16 or kHalf. The EVA ViT file is float16 whatever
  // this says (like the real one); the manifest's dtype is "float32" for kFloat, else "bfloat16".
  at::ScalarType dtype = at::kFloat;
  // Largest LLM safetensors file; a larger model is sharded with model.safetensors.index.json.
  int64_t shard_bytes = int64_t{2} << 30;
  bool write_stage2 = true;

  // Tiny dimensions (the golden folders' sizes; the whole bundle is a few MB, loads in well under a second).
  static RandomBundleShape tiny();
  // The real MiniGPT-5 shapes: Vicuna-7B (vocab 32000 + 9, 4096, 11008, 32 layers, 32 heads,
  // context 2048), EVA ViT-g (224/14, 1408 wide, 39 blocks + 1 unused in the file, 16 heads,
  // MLP 6144), BERT-base Q-Former (768, 12 layers, 12 heads, 3072, 32 queries, cross-attention
  // every 2nd layer), mapper 4096 -> 1024 (4 + 4 layers, ffn 4096), SD 2.1-base UNet and VAE.
  // bfloat16 on disk: about 18 GB.
  static RandomBundleShape minigpt5();

  // ArgumentError naming the field for non-positive sizes and dimensions that do not fit
  // together (heads not dividing widths, sd_dim != unet.cross_attention_dim, vocabulary too
  // small for the tokenizer, ...).
  void validate() const;
};

// Called after each file is written: its path (relative to the bundle dir) and size in bytes.
using RandomBundleProgress = std::function<void(const std::string& file, int64_t bytes)>;

// Writes the bundle into `dir` (created if needed; existing files of the same names are
// replaced) and returns the manifest's path (<dir>/bundle.json). Deterministic in (shape, seed).
// Tensors are generated file by file (LLM shard by shard), so peak memory stays near the largest
// file (~2 GB at the real shape), not the bundle's size. ArgumentError for a bad shape,
// FormatError when a file cannot be written.
std::string write_random_bundle(const std::string& dir, const RandomBundleShape& shape, uint64_t seed,
                                const RandomBundleProgress& progress = {});

}  // namespace voken::pipeline
