// Writing sentencepiece `tokenizer.model` files without libsentencepiece: a serializer of the
// ModelProto fields a BPE model needs (the counterpart of sentencepiece_model.h's reader), and a
// small deterministic English vocabulary in LLaMA's layout, for random-weight bundles and tests.
//
// The files load in Python's sentencepiece (0.1.97 checked by tests/pipeline/test_random_bundle.cpp)
// and encode there exactly as in voken's reader.
#pragma once

#include <string>
#include <vector>

#include "text/sentencepiece_model.h"

namespace voken::text {

// The trainer and normalizer settings of LLaMA's tokenizer.model: BPE, byte_fallback,
// split_digits, <unk>/<s>/</s> = 0/1/2, no pad, the "identity" normalizer with a dummy prefix,
// whitespace escaped and extra whitespace kept.
SentencePieceSpec llama_sentencepiece_spec();

// A serialized ModelProto holding `pieces` in order (id = index) and `spec`. ArgumentError when
// sentencepiece would refuse the result (duplicate or empty pieces, no unknown piece, missing
// byte pieces with byte_fallback, a model type other than BPE).
std::string serialize_sentencepiece_model(const std::vector<Piece>& pieces,
                                          const SentencePieceSpec& spec = llama_sentencepiece_spec());

// serialize_sentencepiece_model written to `path` (FormatError when it cannot be written).
void write_sentencepiece_model(const std::string& path, const std::vector<Piece>& pieces,
                               const SentencePieceSpec& spec = llama_sentencepiece_spec());

// A deterministic BPE vocabulary of exactly `vocab_size` pieces in LLaMA's layout:
//   0 <unk>, 1 <s>, 2 </s>, 3..258 the byte pieces <0x00>..<0xFF> (byte fallback), then merged
//   pieces in merge order (score -k for the k-th merge), then the single characters (printable
//   ASCII and U+2581, the escaped space) with scores below every merge.
// The merges are learnt by plain BPE from a built-in list of common English words (weighted by
// rank), split like sentencepiece's trainer (a word starts with U+2581; letters, digits and
// punctuation never share a piece), so English text encodes into multi-character pieces. When
// the words run out of merges (about 2000), further pieces join a word-start piece with a
// word-continuation piece: still valid BPE merges, rarely used. As in LLaMA, "###" after a space
// is the single piece "▁###" and without one "##" "#" (no piece "###"), so the stop sequences
// upstream hard-codes as ids [835] and [2277, 29937] are, in any such vocabulary,
// [id("▁###")] and [id("##"), id("#")].
// ArgumentError when vocab_size is below 259 + the character count + 16.
std::vector<Piece> english_bpe_vocabulary(int vocab_size);

}  // namespace voken::text
