#include "io/torch_file.h"

#include <ATen/ATen.h>

#include <cstring>
#include <map>
#include <set>

#include "io/tensor_bytes.h"
#include "io/zip_archive.h"
#include "voken/error.h"

namespace voken::io {
namespace {

// The first bytes of a pre-1.6 (non-zip) torch.save file: pickle protocol 2, then the magic
// number 0x1950a86a20f9469cfc6c as a LONG1.
bool is_legacy_torch(const MappedFile& file) {
  static const uint8_t kLegacy[] = {0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c,
                                    0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19};
  return file.size() >= sizeof kLegacy && std::memcmp(file.data(), kLegacy, sizeof kLegacy) == 0;
}

std::string pid_string(const PyObjects& objects, PyRef ref, const char* what, const std::string& source) {
  const PyObject& o = objects[ref];
  if (o.kind != PyKind::String && o.kind != PyKind::Int)
    throw FormatError(source + ": storage persistent id has a bad " + what);
  return o.kind == PyKind::String ? o.str : std::to_string(o.integer);
}

}  // namespace

bool is_torch_file(const MappedFile& file) {
  return is_legacy_torch(file) || (file.size() >= 4 && std::memcmp(file.data(), "PK\x03\x04", 4) == 0);
}

TorchFile load_torch_file(const std::string& path) { return load_torch_file(MappedFile::open(path)); }

TorchFile load_torch_file(const std::shared_ptr<MappedFile>& file) {
  const std::string& path = file->path();
  if (is_legacy_torch(*file))
    throw FormatError(path +
                      ": legacy (pre-zip) torch.save format, written by torch < 1.6 or with "
                      "_use_new_zipfile_serialization=False; re-save it with a current torch "
                      "(torch.save(torch.load(f), f)) to load it in voken");
  if (file->size() < 4 || std::memcmp(file->data(), "PK\x03\x04", 4) != 0)
    throw FormatError(path + ": not a torch.save zip checkpoint (no zip signature)");
  // The zip directory and the local headers are scattered over the file: no readahead while
  // parsing them (a cold 2 GB checkpoint otherwise reads ~15% of itself just to be indexed).
  file->advise_random_access(true);
  const ZipArchive archive = ZipArchive::open(file);

  // torch.save writes <prefix>/data.pkl, <prefix>/data/<key>, <prefix>/version.
  std::string prefix;
  const ZipRecord* pickle_record = nullptr;
  for (const auto& record : archive.records()) {
    const auto slash = record.name.find('/');
    if (slash != std::string::npos && record.name.compare(slash, std::string::npos, "/data.pkl") == 0) {
      prefix = record.name.substr(0, slash + 1);
      pickle_record = &record;
      break;
    }
  }
  // torch.jit.save archives hold a data.pkl too, next to code/ and constants.pkl.
  for (const auto& record : archive.records())
    if (record.name.find("constants.pkl") != std::string::npos ||
        record.name.find("/code/") != std::string::npos)
      throw FormatError(path + ": a TorchScript archive (torch.jit.save), not a torch.save checkpoint");
  if (pickle_record == nullptr)
    throw FormatError(path + ": zip archive without a <name>/data.pkl record: not a torch.save checkpoint");
  if (const ZipRecord* order = archive.find(prefix + "byteorder")) {
    const std::string value(reinterpret_cast<const char*>(file->data() + order->data_offset), order->size);
    if (value != "little")
      throw FormatError(path + ": tensors stored in '" + value +
                        "' byte order; voken reads little-endian only");
  }
  for (const auto& record : archive.records())
    if (record.method != 0)
      throw FormatError(path + ": zip record '" + record.name + "' is compressed (method " +
                        std::to_string(record.method) +
                        "); torch.save stores records uncompressed — "
                        "was the file re-zipped?");

  std::map<std::string, PyRef> storages;  // shared storages become one object
  const PersistentLoader load_storage = [&](PyObjects& objects, PyRef pid) -> PyRef {
    const PyObject& id = objects[pid];
    if (id.kind != PyKind::Tuple || id.items.size() != 5 || objects[id.items[0]].kind != PyKind::String ||
        objects[id.items[0]].str != "storage")
      throw FormatError(path +
                        ": unsupported persistent id in data.pkl (expected a ('storage', type, key, "
                        "location, numel) tuple)");
    const PyObject& type = objects[id.items[1]];
    const auto dtype = type.kind == PyKind::Global && type.str.rfind("torch.", 0) == 0
                           ? dtype_from_storage_class(type.str.substr(6))
                           : std::nullopt;
    if (!dtype) throw FormatError(path + ": unsupported storage type '" + type.str + "'");
    const std::string key = pid_string(objects, id.items[2], "key", path);
    const PyObject& numel_object = objects[id.items[4]];
    if (numel_object.kind != PyKind::Int || numel_object.integer < 0)
      throw FormatError(path + ": storage '" + key + "' has a bad element count");
    const auto found = storages.find(key);
    if (found != storages.end()) {
      if (objects[found->second].tensor.scalar_type() != *dtype)
        throw FormatError(path + ": storage '" + key + "' is referenced with two different element types");
      return found->second;
    }
    const ZipRecord* record = archive.find(prefix + "data/" + key);
    if (record == nullptr)
      throw FormatError(path + ": storage record '" + prefix + "data/" + key + "' is missing");
    const auto element_size = static_cast<uint64_t>(c10::elementSize(*dtype));
    const auto numel = static_cast<uint64_t>(numel_object.integer);
    if (numel > record->size / element_size)
      throw FormatError(path + ": storage '" + key + "' declares " + std::to_string(numel) + " " +
                        type.str.substr(6) + " elements but its record holds " +
                        std::to_string(record->size) + " bytes");
    PyObject storage;
    storage.kind = PyKind::Storage;
    storage.str = key;
    storage.tensor = tensor_over_mapping(file, record->data_offset, numel * element_size, *dtype);
    const PyRef ref = objects.add(std::move(storage));
    storages.emplace(key, ref);
    return ref;
  };
  TorchFile result;
  result.path = path;
  result.pickle = unpickle(file->data() + pickle_record->data_offset, pickle_record->size,
                           path + " (" + pickle_record->name + ")", load_storage);
  file->advise_random_access(false);  // tensors are read front to back: readahead helps again
  return result;
}

std::vector<std::pair<std::string, at::Tensor>> torch_state_dict(const TorchFile& file,
                                                                 const std::string& inner_key) {
  const PyObjects& objects = file.pickle.objects;
  const PyRef root = file.pickle.root;
  auto tensor_count = [&](PyRef dict) {
    std::size_t n = 0;
    for (const auto& [k, v] : objects[dict].entries) n += objects[v].kind == PyKind::Tensor;
    return n;
  };
  auto top_keys = [&]() {
    std::string keys;
    if (objects[root].kind != PyKind::Dict)
      return std::string("(root is a ") + py_kind_name(objects[root].kind) + ")";
    for (const auto& [k, v] : objects[root].entries)
      if (objects[k].kind == PyKind::String) keys += (keys.empty() ? "" : ", ") + objects[k].str;
    return "top-level keys: " + keys;
  };
  PyRef dict = PyObjects::kNone;
  if (!inner_key.empty()) {
    dict = objects.find_ref(root, inner_key);
    if (dict == PyObjects::kNone || objects[dict].kind != PyKind::Dict)
      throw WeightsError(file.path + ": no dict of tensors under key '" + inner_key + "' (" + top_keys() +
                         ")");
  } else if (objects[root].kind == PyKind::Dict && tensor_count(root) > 0) {
    dict = root;
  } else {
    for (const char* key : {"state_dict", "model", "module"}) {
      const PyRef candidate = objects.find_ref(root, key);
      if (candidate != PyObjects::kNone && objects[candidate].kind == PyKind::Dict &&
          tensor_count(candidate) > 0) {
        dict = candidate;
        break;
      }
    }
    if (dict == PyObjects::kNone)
      throw WeightsError(file.path +
                         ": no state dict found (looked at the root, 'state_dict', 'model', "
                         "'module'; " +
                         top_keys() + ")");
  }
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  for (const auto& [k, v] : objects[dict].entries) {
    if (objects[v].kind != PyKind::Tensor) continue;
    if (objects[k].kind != PyKind::String)
      throw WeightsError(file.path + ": state dict key of type " + py_kind_name(objects[k].kind));
    tensors.emplace_back(objects[k].str, objects[v].tensor);
  }
  return tensors;
}

// ---------------------------------------------------------------------------------------------
// Writing

PickleValue PickleValue::of(bool v) {
  PickleValue p;
  p.kind = Kind::Bool;
  p.boolean = v;
  return p;
}
PickleValue PickleValue::of(int64_t v) {
  PickleValue p;
  p.kind = Kind::Int;
  p.integer = v;
  return p;
}
PickleValue PickleValue::of(double v) {
  PickleValue p;
  p.kind = Kind::Float;
  p.real = v;
  return p;
}
PickleValue PickleValue::of(std::string v) {
  PickleValue p;
  p.kind = Kind::String;
  p.str = std::move(v);
  return p;
}
PickleValue PickleValue::of(at::Tensor v) {
  PickleValue p;
  p.kind = Kind::Tensor;
  p.tensor = std::move(v);
  return p;
}
PickleValue PickleValue::list(std::vector<PickleValue> v) {
  PickleValue p;
  p.kind = Kind::List;
  p.items = std::move(v);
  return p;
}
PickleValue PickleValue::tuple(std::vector<PickleValue> v) {
  PickleValue p;
  p.kind = Kind::Tuple;
  p.items = std::move(v);
  return p;
}
PickleValue PickleValue::dict(std::vector<std::pair<std::string, PickleValue>> v) {
  PickleValue p;
  p.kind = Kind::Dict;
  p.entries = std::move(v);
  return p;
}
PickleValue PickleValue::ns(std::vector<std::pair<std::string, PickleValue>> v) {
  PickleValue p;
  p.kind = Kind::Namespace;
  p.entries = std::move(v);
  return p;
}

namespace {

class PickleWriter {
 public:
  struct Storage {
    std::string key;
    at::Tensor bytes;  // the whole storage, as a 1-D tensor of its dtype
  };

  void value(const PickleValue& v) {
    using Kind = PickleValue::Kind;
    switch (v.kind) {
      case Kind::None:
        op('N');
        break;
      case Kind::Bool:
        op(v.boolean ? 0x88 : 0x89);
        break;
      case Kind::Int:
        integer(v.integer);
        break;
      case Kind::Float: {
        op('G');
        uint64_t bits;
        std::memcpy(&bits, &v.real, 8);
        for (int i = 7; i >= 0; --i) out_.push_back(static_cast<char>((bits >> (8 * i)) & 0xff));
        break;
      }
      case Kind::String:
        string(v.str);
        break;
      case Kind::List:
        op(']');
        if (!v.items.empty()) {
          op('(');
          for (const auto& item : v.items) value(item);
          op('e');
        }
        break;
      case Kind::Tuple:
        op('(');
        for (const auto& item : v.items) value(item);
        op('t');
        break;
      case Kind::Dict:
        global("collections", "OrderedDict");
        op(')');
        op('R');
        items(v.entries);
        break;
      case Kind::Namespace:
        global("argparse", "Namespace");
        op(')');
        op(0x81);  // NEWOBJ
        op('}');
        items(v.entries);
        op('b');  // BUILD: the attributes
        break;
      case Kind::Tensor:
        tensor(v.tensor);
        break;
    }
  }

  std::string finish() {
    op('.');
    return std::move(out_);
  }
  const std::vector<Storage>& storages() const { return storages_; }

 private:
  void op(int code) { out_.push_back(static_cast<char>(code)); }
  void raw(uint64_t value, int bytes) {
    for (int i = 0; i < bytes; ++i) out_.push_back(static_cast<char>((value >> (8 * i)) & 0xff));
  }
  void integer(int64_t v) {
    if (v >= 0 && v < 256) {
      op('K');
      raw(static_cast<uint64_t>(v), 1);
    } else if (v >= INT32_MIN && v <= INT32_MAX) {
      op('J');
      raw(static_cast<uint32_t>(static_cast<int32_t>(v)), 4);
    } else {
      op(0x8a);
      raw(8, 1);
      raw(static_cast<uint64_t>(v), 8);
    }
  }
  void string(const std::string& s) {
    op('X');
    raw(s.size(), 4);
    out_ += s;
  }
  void global(const char* module, const char* name) {
    op('c');
    out_ += module;
    out_ += '\n';
    out_ += name;
    out_ += '\n';
  }
  void items(const std::vector<std::pair<std::string, PickleValue>>& entries) {
    if (entries.empty()) return;
    op('(');
    for (const auto& [key, item] : entries) {
      string(key);
      value(item);
    }
    op('u');
  }
  void tensor(const at::Tensor& input) {
    const at::Tensor t = input.device().is_cpu() ? input : input.to(at::kCPU);
    const auto* impl = t.storage().unsafeGetStorageImpl();
    std::string key;
    const auto found = keys_.find(impl);
    if (found != keys_.end()) {
      key = found->second;
      // torch.save refuses this too: a torch file names one element type per storage.
      const auto stored = storages_[std::stoul(key)].bytes.scalar_type();
      if (stored != t.scalar_type())
        throw ArgumentError(std::string("cannot save tensors that view one storage as different dtypes (") +
                            c10::toString(stored) + " and " + c10::toString(t.scalar_type()) + ")");
    } else {
      key = std::to_string(storages_.size());
      keys_.emplace(impl, key);
      const auto numel = static_cast<int64_t>(t.storage().nbytes() / t.element_size());
      storages_.push_back({key, at::empty({0}, t.options()).set_(t.storage(), 0, {numel}, {1})});
    }
    global("torch._utils", "_rebuild_tensor_v2");
    op('(');
    op('(');
    string("storage");
    global("torch", storage_class_name(t.scalar_type()).c_str());
    string(key);
    string("cpu");
    integer(static_cast<int64_t>(t.storage().nbytes() / t.element_size()));
    op('t');
    op('Q');  // BINPERSID
    integer(t.storage_offset());
    op('(');
    for (auto s : t.sizes()) integer(s);
    op('t');
    op('(');
    for (auto s : t.strides()) integer(s);
    op('t');
    op(0x89);  // requires_grad False
    global("collections", "OrderedDict");
    op(')');
    op('R');
    op('t');
    op('R');
  }

  std::string out_ = std::string("\x80\x02", 2);
  std::map<const void*, std::string> keys_;
  std::vector<Storage> storages_;
};

}  // namespace

void save_torch_file(const std::string& path, const PickleValue& root) {
  PickleWriter writer;
  writer.value(root);
  const std::string pickle = writer.finish();
  std::string stem = path.substr(path.find_last_of('/') + 1);
  stem = stem.substr(0, stem.find('.'));
  if (stem.empty()) stem = "archive";
  ZipWriter zip(path);
  zip.add(stem + "/data.pkl", pickle.data(), pickle.size());
  for (const auto& storage : writer.storages()) {
    const auto& bytes = storage.bytes;
    zip.add(stem + "/data/" + storage.key, bytes.data_ptr(), bytes.numel() * bytes.element_size());
  }
  zip.add(stem + "/version", "3\n", 2);
  zip.finish();
}

void save_torch_state_dict(const std::string& path,
                           const std::vector<std::pair<std::string, at::Tensor>>& tensors) {
  std::vector<std::pair<std::string, PickleValue>> entries;
  entries.reserve(tensors.size());
  for (const auto& [name, tensor] : tensors) entries.emplace_back(name, PickleValue::of(tensor));
  save_torch_file(path, PickleValue::dict(std::move(entries)));
}

}  // namespace voken::io
