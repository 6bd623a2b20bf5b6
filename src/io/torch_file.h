// Checkpoints written by torch.save (zip format, torch >= 1.6): .pth, .pt, .bin, Lightning
// .ckpt. Read with no Python: a minimal zip reader, the safe pickle VM and zero-copy storages
// (torch.save stores records uncompressed and 64-byte aligned).
#pragma once

#include <ATen/core/Tensor.h>

#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "io/mapped_file.h"
#include "io/pickle.h"

namespace voken::io {

struct TorchFile {
  std::string path;
  Unpickled pickle;  // the object tree of data.pkl; tensors view the mapping
};

// Throws FileNotFoundError, or FormatError for legacy (pre-zip) torch files, TorchScript
// archives, compressed or out-of-range records, unsafe or unsupported pickles.
TorchFile load_torch_file(const std::string& path);
TorchFile load_torch_file(const std::shared_ptr<MappedFile>& file);

// True if the file starts like something torch.save wrote: a zip archive, or the exact
// signature of the legacy format (which load_torch_file then refuses with an explanation).
bool is_torch_file(const MappedFile& file);

// Extracts the tensors of a state dict from a loaded checkpoint, in pickle order:
// `inner_key` empty = auto: the root dict when its values are tensors, else the first of
// "state_dict" (Lightning), "model" (LAVIS/MiniGPT-4), "module" that is a dict of tensors.
// Non-tensor values inside the chosen dict are skipped.
std::vector<std::pair<std::string, at::Tensor>> torch_state_dict(const TorchFile& file,
                                                                 const std::string& inner_key = "");

// A pickle writer for the plain values checkpoints hold, used to write .pth/.ckpt fixtures and
// the demo bundle in the real format (torch.load reads them).
struct PickleValue {
  enum class Kind { None, Bool, Int, Float, String, List, Tuple, Dict, Tensor, Namespace };
  Kind kind = Kind::None;
  bool boolean = false;
  int64_t integer = 0;
  double real = 0.0;
  std::string str;
  std::vector<PickleValue> items;                            // List, Tuple
  std::vector<std::pair<std::string, PickleValue>> entries;  // Dict, Namespace (ordered)
  at::Tensor tensor;

  static PickleValue none() { return {}; }
  static PickleValue of(bool v);
  static PickleValue of(int64_t v);
  static PickleValue of(int v) { return of(static_cast<int64_t>(v)); }
  static PickleValue of(double v);
  static PickleValue of(std::string v);
  static PickleValue of(const char* v) { return of(std::string(v)); }
  static PickleValue of(at::Tensor v);
  static PickleValue list(std::vector<PickleValue> v);
  static PickleValue tuple(std::vector<PickleValue> v);
  static PickleValue dict(std::vector<std::pair<std::string, PickleValue>> v);  // OrderedDict
  static PickleValue ns(std::vector<std::pair<std::string, PickleValue>> v);    // argparse.Namespace
};

// Writes `root` like torch.save(root, path): zip with <stem>/data.pkl, <stem>/data/<k>,
// <stem>/version; records stored and 64-byte aligned. Tensors sharing storage are written once.
void save_torch_file(const std::string& path, const PickleValue& root);

// Convenience: an OrderedDict of tensors, like torch.save(model.state_dict()).
void save_torch_state_dict(const std::string& path,
                           const std::vector<std::pair<std::string, at::Tensor>>& tensors);

}  // namespace voken::io
