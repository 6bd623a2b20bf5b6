#include "io/pickle.h"

#include <ATen/ATen.h>

#include <cstdlib>
#include <cstring>
#include <limits>
#include <unordered_map>

#include "io/tensor_bytes.h"
#include "voken/error.h"

namespace voken::io {

const char* py_kind_name(PyKind kind) {
  switch (kind) {
    case PyKind::None:
      return "None";
    case PyKind::Bool:
      return "bool";
    case PyKind::Int:
      return "int";
    case PyKind::Float:
      return "float";
    case PyKind::String:
      return "str";
    case PyKind::Bytes:
      return "bytes";
    case PyKind::List:
      return "list";
    case PyKind::Tuple:
      return "tuple";
    case PyKind::Dict:
      return "dict";
    case PyKind::Set:
      return "set";
    case PyKind::Tensor:
      return "tensor";
    case PyKind::Storage:
      return "storage";
    case PyKind::Global:
      return "global";
    case PyKind::Object:
      return "object";
  }
  return "?";
}

PyRef PyObjects::add(PyObject object) {
  if (objects_.size() >= kNone) throw FormatError("pickle creates too many objects");
  objects_.push_back(std::move(object));
  return static_cast<PyRef>(objects_.size() - 1);
}

PyRef PyObjects::find_ref(PyRef dict, const std::string& key) const {
  const auto& d = objects_.at(dict);
  if (d.kind != PyKind::Dict) return kNone;
  for (const auto& [k, v] : d.entries)
    if (objects_.at(k).kind == PyKind::String && objects_.at(k).str == key) return v;
  return kNone;
}

const PyObject* PyObjects::find(PyRef dict, const std::string& key) const {
  const PyRef ref = find_ref(dict, key);
  return ref == kNone ? nullptr : &objects_.at(ref);
}

bool is_denied_global(const std::string& module, const std::string& name) {
  // Modules whose names can reach the OS, the interpreter or arbitrary code.
  static const char* const kDeniedModules[] = {
      "os",       "posix",     "nt",        "subprocess", "sys",        "shutil",
      "socket",   "importlib", "runpy",     "pickle",     "_pickle",    "marshal",
      "ctypes",   "code",      "codeop",    "pty",        "webbrowser", "multiprocessing",
      "signal",   "types",     "functools", "operator",   "io",         "_io",
      "platform", "inspect",   "threading", "_thread",    "asyncio",    "pdb",
      "timeit",   "bdb",       "ast"};
  const std::string root = module.substr(0, module.find('.'));
  for (const char* denied : kDeniedModules)
    if (module == denied || root == denied) return true;
  if (module == "builtins" || module == "__builtin__") {
    // Plain data types only; eval/exec/getattr/__import__/open/compile... are refused.
    static const char* const kSafeBuiltins[] = {"set",  "frozenset", "slice", "complex", "bytearray",
                                                "dict", "list",      "tuple", "int",     "float",
                                                "str",  "bool",      "bytes", "range",   "object"};
    for (const char* safe : kSafeBuiltins)
      if (name == safe) return false;
    return true;
  }
  if (root == "torch") {
    // torch.load, torch.jit.*, torch.hub.*, torch.ops.* and friends could run code in a real
    // unpickler; only data-describing names are accepted.
    if (module == "torch._utils" || module == "torch._tensor") return name.rfind("_rebuild", 0) != 0;
    if (module == "torch") {
      if (name.size() > 7 && name.compare(name.size() - 7, 7, "Storage") == 0) return false;
      static const char* const kTorchData[] = {
          "Size",          "device",         "dtype",      "strided", "sparse_coo",
          "float32",       "float",          "float64",    "double",  "float16",
          "half",          "bfloat16",       "int64",      "long",    "int32",
          "int",           "int16",          "short",      "int8",    "uint8",
          "bool",          "complex64",      "complex128", "Tensor",  "contiguous_format",
          "channels_last", "preserve_format"};
      for (const char* safe : kTorchData)
        if (name == safe) return false;
      return true;
    }
    if (module == "torch.nn.parameter" && name == "Parameter") return false;
    return module.rfind("torch.jit", 0) == 0 || module.rfind("torch.hub", 0) == 0 ||
           module.rfind("torch._C", 0) == 0 || module.rfind("torch.ops", 0) == 0 ||
           module == "torch.serialization" || module.rfind("torch.utils.cpp_extension", 0) == 0;
  }
  return false;
}

namespace {

// Protocol 0-2 pickles (torch.save's default is 2) name some modules as Python 2 did; Python 3's
// unpickler renames them (_compat_pickle), and so do we, so that e.g. __builtin__.set is a set
// and commands.call is refused like subprocess.call.
std::string python3_module_name(const std::string& module) {
  static const std::pair<const char*, const char*> kRenames[] = {
      {"__builtin__", "builtins"}, {"copy_reg", "copyreg"},     {"commands", "subprocess"},
      {"exceptions", "builtins"},  {"UserDict", "collections"}, {"cPickle", "pickle"},
      {"cStringIO", "io"},         {"StringIO", "io"},          {"urllib2", "urllib.request"}};
  for (const auto& [old_name, new_name] : kRenames)
    if (module == old_name) return new_name;
  return module;
}

class Machine {
 public:
  Machine(const uint8_t* data, std::size_t size, const std::string& source,
          const PersistentLoader& persistent_load)
      : data_(data), size_(size), source_(source), persistent_load_(persistent_load) {}

  Unpickled run() {
    while (true) {
      const std::size_t op_position = position_;
      const uint8_t op = read_byte();
      if (op == '.') break;  // STOP
      try {
        execute(op);
      } catch (const FormatError&) {
        throw;
      } catch (const std::exception& e) {
        fail(op_position, std::string("opcode ") + describe(op) + ": " + e.what());
      }
    }
    if (stack_.size() != 1)
      fail(position_, "STOP with " + std::to_string(stack_.size()) + " values on the stack");
    Unpickled result;
    result.root = stack_.back();
    result.objects = std::move(objects_);
    return result;
  }

 private:
  [[noreturn]] void fail(std::size_t position, const std::string& what) const {
    throw FormatError(source_ + ": pickle byte " + std::to_string(position) + ": " + what);
  }

  static std::string describe(uint8_t op) {
    char buffer[16];
    if (op >= 0x20 && op < 0x7f)
      std::snprintf(buffer, sizeof buffer, "'%c'", op);
    else
      std::snprintf(buffer, sizeof buffer, "0x%02x", op);
    return buffer;
  }

  // -- reading -------------------------------------------------------------------------------
  void need(std::size_t n) const {
    if (n > size_ - position_)
      fail(position_, "truncated pickle (needs " + std::to_string(n) + " bytes, " +
                          std::to_string(size_ - position_) + " left)");
  }
  uint8_t read_byte() {
    need(1);
    return data_[position_++];
  }
  uint64_t read_uint(int bytes) {
    need(static_cast<std::size_t>(bytes));
    uint64_t value = 0;
    for (int i = bytes - 1; i >= 0; --i) value = (value << 8) | data_[position_ + i];
    position_ += static_cast<std::size_t>(bytes);
    return value;
  }
  std::string read_bytes(uint64_t n) {
    if (n > size_ - position_)
      fail(position_, "length " + std::to_string(n) + " runs past the end of the pickle");
    std::string out(reinterpret_cast<const char*>(data_ + position_), static_cast<std::size_t>(n));
    position_ += static_cast<std::size_t>(n);
    return out;
  }
  std::string read_line() {
    const void* newline = std::memchr(data_ + position_, '\n', size_ - position_);
    if (newline == nullptr) fail(position_, "unterminated text line");
    const auto length = static_cast<std::size_t>(static_cast<const uint8_t*>(newline) - (data_ + position_));
    std::string line = read_bytes(length);
    ++position_;
    return line;
  }

  // -- stack ---------------------------------------------------------------------------------
  PyRef push(PyObject object) {
    const PyRef ref = objects_.add(std::move(object));
    stack_.push_back(ref);
    return ref;
  }
  PyRef pop() {
    if (stack_.size() <= stack_floor()) fail(position_, "stack underflow");
    const PyRef ref = stack_.back();
    stack_.pop_back();
    return ref;
  }
  PyRef top() {
    if (stack_.size() <= stack_floor()) fail(position_, "stack underflow");
    return stack_.back();
  }
  std::size_t stack_floor() const { return marks_.empty() ? 0 : marks_.back(); }
  std::vector<PyRef> pop_to_mark() {
    if (marks_.empty()) fail(position_, "no MARK on the stack");
    const std::size_t mark = marks_.back();
    marks_.pop_back();
    std::vector<PyRef> items(stack_.begin() + static_cast<std::ptrdiff_t>(mark), stack_.end());
    stack_.resize(mark);
    return items;
  }
  PyObject& object(PyRef ref) { return objects_[ref]; }

  // Copies of containers (list(x), tuple(x)) cost work not bounded by the pickle's size; a
  // budget keeps hostile files from making loading quadratic.
  void charge(std::size_t items) {
    work_ += items;
    if (work_ > kWorkBudget)
      fail(position_, "pickle copies more than " + std::to_string(kWorkBudget) + " items");
  }
  static constexpr std::size_t kWorkBudget = std::size_t(1) << 28;
  std::size_t work_ = 0;
  PyObject& expect(PyRef ref, PyKind kind, const char* what) {
    PyObject& o = objects_[ref];
    if (o.kind != kind)
      fail(position_,
           std::string(what) + ": expected " + py_kind_name(kind) + ", got " + py_kind_name(o.kind));
    return o;
  }

  static PyObject make(PyKind kind) {
    PyObject o;
    o.kind = kind;
    return o;
  }
  static PyObject make_int(int64_t v) {
    PyObject o = make(PyKind::Int);
    o.integer = v;
    return o;
  }
  static PyObject make_string(PyKind kind, std::string s) {
    PyObject o = make(kind);
    o.str = std::move(s);
    return o;
  }

  void memo_put(uint64_t index) { memo_[index] = top(); }
  void memo_get(uint64_t index) {
    const auto it = memo_.find(index);
    if (it == memo_.end()) fail(position_, "memo key " + std::to_string(index) + " not found");
    stack_.push_back(it->second);
  }

  int64_t parse_decimal(const std::string& text) {
    std::string digits = text;
    if (!digits.empty() && digits.back() == 'L') digits.pop_back();
    errno = 0;
    char* end = nullptr;
    const long long value = std::strtoll(digits.c_str(), &end, 10);
    if (digits.empty() || *end != '\0' || errno == ERANGE) fail(position_, "bad integer '" + text + "'");
    return value;
  }

  void push_long(uint64_t nbytes) {
    if (nbytes > 8) fail(position_, "integer of " + std::to_string(nbytes) + " bytes does not fit int64");
    need(static_cast<std::size_t>(nbytes));
    uint64_t value = 0;
    for (uint64_t i = 0; i < nbytes; ++i) value |= uint64_t(data_[position_ + i]) << (8 * i);
    if (nbytes > 0 && nbytes < 8 && (data_[position_ + nbytes - 1] & 0x80))
      value |= ~uint64_t(0) << (8 * nbytes);  // sign-extend two's complement
    position_ += static_cast<std::size_t>(nbytes);
    push(make_int(static_cast<int64_t>(value)));
  }

  void push_global(std::string module, std::string name) {  // by value: push() may move objects
    module = python3_module_name(module);
    if (is_denied_global(module, name))
      fail(position_, "disallowed global '" + module + "." + name +
                          "': voken only rebuilds tensors and plain data, it never runs code "
                          "from a checkpoint");
    push(make_string(PyKind::Global, module + "." + name));
  }

  // -- the allow-listed reconstructors --------------------------------------------------------
  std::vector<int64_t> int_tuple(PyRef ref, const char* what) {
    const PyObject& o = objects_[ref];
    if (o.kind != PyKind::Tuple && o.kind != PyKind::List)
      fail(position_, std::string(what) + " is not a tuple");
    std::vector<int64_t> values;
    for (PyRef item : o.items) values.push_back(expect(item, PyKind::Int, what).integer);
    return values;
  }

  PyObject rebuild_tensor(const std::vector<PyRef>& args) {
    if (args.size() < 4) fail(position_, "_rebuild_tensor needs storage, offset, size, stride");
    const PyObject& storage = expect(args[0], PyKind::Storage, "tensor storage");
    const int64_t offset = expect(args[1], PyKind::Int, "storage offset").integer;
    const auto sizes = int_tuple(args[2], "tensor size");
    const auto strides = int_tuple(args[3], "tensor stride");
    const int64_t storage_numel = storage.tensor.numel();
    // Built only when something is wrong: successful loads should not pay for the message.
    const auto what = [&] {
      return "tensor of size " + shape_string(sizes) + " stride " + shape_string(strides) + " offset " +
             std::to_string(offset) + " on a storage of " + std::to_string(storage_numel) + " elements";
    };
    if (sizes.size() != strides.size()) fail(position_, what() + ": size and stride ranks differ");
    if (offset < 0) fail(position_, what() + ": negative offset");
    int64_t last = offset;  // highest element index addressed
    bool empty = false;
    for (std::size_t d = 0; d < sizes.size(); ++d) {
      if (sizes[d] < 0 || strides[d] < 0) fail(position_, what() + ": negative size or stride");
      if (sizes[d] == 0) empty = true;
    }
    if (!empty) {
      for (std::size_t d = 0; d < sizes.size(); ++d) {
        const int64_t span = sizes[d] - 1;
        if (strides[d] != 0 && span > (std::numeric_limits<int64_t>::max() - last) / strides[d])
          fail(position_, what() + ": extent overflows");
        last += span * strides[d];
      }
      if (last >= storage_numel) fail(position_, what() + ": addresses elements past the storage");
    }
    PyObject result = make(PyKind::Tensor);
    result.tensor = empty ? at::empty(sizes, storage.tensor.options())
                          : storage.tensor.as_strided(sizes, strides, offset);
    return result;
  }

  // Applies the global `callable` (a "module.name") to `args`.
  PyObject call(const std::string& callable, const std::vector<PyRef>& args, PyRef args_ref) {
    if (callable == "torch._utils._rebuild_tensor_v2" || callable == "torch._utils._rebuild_tensor")
      return rebuild_tensor(args);
    if (callable == "torch._utils._rebuild_parameter" ||
        callable == "torch._utils._rebuild_parameter_with_state") {
      if (args.empty()) fail(position_, callable + " without arguments");
      return expect(args[0], PyKind::Tensor, "parameter data");  // a Parameter is its data
    }
    if (callable == "torch._tensor._rebuild_from_type_v2" || callable == "torch._tensor._rebuild_from_type") {
      // (func, type, args, state): a tensor subclass; the data is what func rebuilds.
      if (args.size() < 3) fail(position_, callable + " needs func, type, args");
      const PyObject& func = expect(args[0], PyKind::Global, "rebuild function");
      if (func.str.rfind("torch._tensor._rebuild_from_type", 0) == 0)
        fail(position_, callable + " nested in itself");  // bounded recursion on hostile input
      const PyObject& inner = expect(args[2], PyKind::Tuple, "rebuild arguments");
      const std::string name = func.str;
      const std::vector<PyRef> inner_args = inner.items;
      return call(name, inner_args, args[2]);
    }
    if (callable == "collections.OrderedDict" || callable == "builtins.dict") {
      PyObject dict = make(PyKind::Dict);
      if (!args.empty() &&
          (objects_[args[0]].kind == PyKind::List || objects_[args[0]].kind == PyKind::Tuple)) {
        for (PyRef pair : objects_[args[0]].items) {
          const PyObject& p = objects_[pair];
          if (p.kind != PyKind::Tuple || p.items.size() != 2)
            fail(position_, "OrderedDict item is not a pair");
          dict.entries.emplace_back(p.items[0], p.items[1]);
        }
      }
      return dict;
    }
    if (callable == "torch.Size" || callable == "builtins.tuple" || callable == "builtins.list" ||
        callable == "builtins.set" || callable == "builtins.frozenset") {
      const PyKind kind = callable == "builtins.list"                                      ? PyKind::List
                          : callable == "builtins.set" || callable == "builtins.frozenset" ? PyKind::Set
                                                                                           : PyKind::Tuple;
      PyObject out = make(kind);
      if (!args.empty()) {
        const PyObject& source = objects_[args[0]];
        if (source.kind != PyKind::Tuple && source.kind != PyKind::List && source.kind != PyKind::Set)
          fail(position_, callable + " of a " + py_kind_name(source.kind));
        charge(source.items.size());
        out.items = source.items;
      }
      return out;
    }
    if (callable == "builtins.bytes" || callable == "builtins.bytearray") {
      // bytes() / bytes(list of ints), as protocol 2 writes b"" and bytearrays.
      PyObject out = make(PyKind::Bytes);
      if (!args.empty()) {
        const PyObject& source = objects_[args[0]];
        if (source.kind == PyKind::Bytes || source.kind == PyKind::String) {
          out.str = source.str;
        } else if (source.kind == PyKind::List || source.kind == PyKind::Tuple) {
          for (PyRef item : source.items) {
            const int64_t byte = expect(item, PyKind::Int, "byte value").integer;
            if (byte < 0 || byte > 255) fail(position_, "byte value out of range");
            out.str.push_back(static_cast<char>(byte));
          }
        } else {
          fail(position_, callable + " of a " + py_kind_name(source.kind));
        }
      }
      return out;
    }
    if (callable == "_codecs.encode") {
      // Protocol 2 pickles bytes as _codecs.encode(text, "latin1").
      if (args.size() != 2) fail(position_, "_codecs.encode needs 2 arguments");
      const std::string& text = expect(args[0], PyKind::String, "_codecs.encode text").str;
      const std::string& encoding = expect(args[1], PyKind::String, "_codecs.encode encoding").str;
      if (encoding != "latin1" && encoding != "latin-1")
        fail(position_, "_codecs.encode with encoding " + encoding);
      return make_string(PyKind::Bytes, utf8_to_latin1(text));
    }
    if (callable == "copyreg._reconstructor") {
      if (args.empty()) fail(position_, "copyreg._reconstructor without a class");
      return placeholder(expect(args[0], PyKind::Global, "reconstructed class").str, PyObjects::kNone);
    }
    // Any other (not denied) class or function: an inert record of what would have been built.
    return placeholder(callable, args_ref);
  }

  std::string utf8_to_latin1(const std::string& text) {
    std::string out;
    for (std::size_t i = 0; i < text.size(); ++i) {
      const auto c = static_cast<uint8_t>(text[i]);
      if (c < 0x80)
        out.push_back(static_cast<char>(c));
      else if ((c & 0xe0) == 0xc0 && i + 1 < text.size() && c <= 0xc3)
        out.push_back(static_cast<char>(((c & 0x03) << 6) | (static_cast<uint8_t>(text[++i]) & 0x3f)));
      else
        fail(position_, "_codecs.encode: text is not latin-1");
    }
    return out;
  }

  PyObject placeholder(std::string class_name, PyRef args_ref) {
    PyObject o = make(PyKind::Object);
    o.str = class_name;
    const PyRef args = args_ref == PyObjects::kNone ? objects_.add(make(PyKind::Tuple)) : args_ref;
    o.items = {args, objects_.add(make(PyKind::None))};
    return o;
  }

  void build(PyRef state, PyRef target) {
    PyObject& o = objects_[target];
    if (o.kind == PyKind::Object) {
      o.items[1] = state;
    }
    // Dict (OrderedDict's _metadata attribute), tensors and the rest carry no state we use.
  }

  void execute(uint8_t op) {
    switch (op) {
      case 0x80: {  // PROTO
        const uint8_t protocol = read_byte();
        if (protocol > 5) fail(position_ - 1, "unsupported pickle protocol " + std::to_string(protocol));
        break;
      }
      case 0x95:
        read_uint(8);
        break;  // FRAME: framing does not change the opcode stream
      case '(':
        marks_.push_back(stack_.size());
        break;
      case '0':
        pop();
        break;
      case '1':
        pop_to_mark();
        break;
      case '2':
        stack_.push_back(top());
        break;
      case 'N':
        push(make(PyKind::None));
        break;
      case 0x88:
      case 0x89: {
        PyObject o = make(PyKind::Bool);
        o.boolean = op == 0x88;
        push(std::move(o));
        break;
      }
      case 'J':
        push(make_int(static_cast<int32_t>(read_uint(4))));
        break;
      case 'K':
        push(make_int(static_cast<int64_t>(read_uint(1))));
        break;
      case 'M':
        push(make_int(static_cast<int64_t>(read_uint(2))));
        break;
      case 0x8a:
        push_long(read_uint(1));
        break;
      case 0x8b:
        push_long(read_uint(4));
        break;
      case 'I': {
        const std::string line = read_line();
        if (line == "00" || line == "01") {
          PyObject o = make(PyKind::Bool);
          o.boolean = line == "01";
          push(std::move(o));
        } else {
          push(make_int(parse_decimal(line)));
        }
        break;
      }
      case 'L':
        push(make_int(parse_decimal(read_line())));
        break;
      case 'F': {
        const std::string line = read_line();
        char* end = nullptr;
        PyObject o = make(PyKind::Float);
        o.real = std::strtod(line.c_str(), &end);
        if (line.empty() || *end != '\0') fail(position_, "bad float '" + line + "'");
        push(std::move(o));
        break;
      }
      case 'G': {
        const uint64_t bits = read_uint(8);
        uint64_t big_endian = 0;
        for (int i = 0; i < 8; ++i) big_endian = (big_endian << 8) | ((bits >> (8 * i)) & 0xff);
        PyObject o = make(PyKind::Float);
        std::memcpy(&o.real, &big_endian, sizeof(double));
        push(std::move(o));
        break;
      }
      case 'X':
        push(make_string(PyKind::String, read_bytes(read_uint(4))));
        break;
      case 0x8c:
        push(make_string(PyKind::String, read_bytes(read_uint(1))));
        break;
      case 0x8d:
        push(make_string(PyKind::String, read_bytes(read_uint(8))));
        break;
      case 'T':
        push(make_string(PyKind::String, read_bytes(read_uint(4))));
        break;
      case 'U':
        push(make_string(PyKind::String, read_bytes(read_uint(1))));
        break;
      case 'B':
        push(make_string(PyKind::Bytes, read_bytes(read_uint(4))));
        break;
      case 'C':
        push(make_string(PyKind::Bytes, read_bytes(read_uint(1))));
        break;
      case 0x8e:
      case 0x96:
        push(make_string(PyKind::Bytes, read_bytes(read_uint(8))));
        break;
      case ']':
        push(make(PyKind::List));
        break;
      case ')':
        push(make(PyKind::Tuple));
        break;
      case '}':
        push(make(PyKind::Dict));
        break;
      case 0x8f:
        push(make(PyKind::Set));
        break;
      case 'l':
      case 't':
      case 0x91: {
        PyObject o = make(op == 'l' ? PyKind::List : op == 't' ? PyKind::Tuple : PyKind::Set);
        o.items = pop_to_mark();
        push(std::move(o));
        break;
      }
      case 0x85:
      case 0x86:
      case 0x87: {
        const std::size_t n = op - 0x84u;
        if (stack_.size() < stack_floor() + n) fail(position_, "stack underflow");
        PyObject o = make(PyKind::Tuple);
        o.items.assign(stack_.end() - static_cast<std::ptrdiff_t>(n), stack_.end());
        stack_.resize(stack_.size() - n);
        push(std::move(o));
        break;
      }
      case 'd': {
        const auto items = pop_to_mark();
        if (items.size() % 2) fail(position_, "DICT with an odd number of items");
        PyObject o = make(PyKind::Dict);
        for (std::size_t i = 0; i < items.size(); i += 2) o.entries.emplace_back(items[i], items[i + 1]);
        push(std::move(o));
        break;
      }
      case 'a': {
        const PyRef value = pop();
        append(top(), {value});
        break;
      }
      case 'e': {
        const auto items = pop_to_mark();
        append(top(), items);
        break;
      }
      case 0x90: {  // ADDITEMS
        const auto items = pop_to_mark();
        PyObject& set = expect(top(), PyKind::Set, "ADDITEMS target");
        set.items.insert(set.items.end(), items.begin(), items.end());
        break;
      }
      case 's': {
        const PyRef value = pop();
        const PyRef key = pop();
        set_items(top(), {key, value});
        break;
      }
      case 'u': {
        const auto items = pop_to_mark();
        if (items.size() % 2) fail(position_, "SETITEMS with an odd number of items");
        set_items(top(), items);
        break;
      }
      case 'p':
        memo_put(static_cast<uint64_t>(parse_decimal(read_line())));
        break;
      case 'q':
        memo_put(read_uint(1));
        break;
      case 'r':
        memo_put(read_uint(4));
        break;
      case 0x94:
        memo_put(memo_.size());
        break;
      case 'g':
        memo_get(static_cast<uint64_t>(parse_decimal(read_line())));
        break;
      case 'h':
        memo_get(read_uint(1));
        break;
      case 'j':
        memo_get(read_uint(4));
        break;
      case 'c': {
        const std::string module = read_line();
        const std::string name = read_line();
        push_global(module, name);
        break;
      }
      case 0x93: {  // STACK_GLOBAL
        const PyRef name = pop();
        const PyRef module = pop();
        push_global(expect(module, PyKind::String, "STACK_GLOBAL module").str,
                    expect(name, PyKind::String, "STACK_GLOBAL name").str);
        break;
      }
      case 'R': {
        const PyRef args = pop();
        const PyRef callable = pop();
        const std::string name = expect(callable, PyKind::Global, "REDUCE callable").str;
        const std::vector<PyRef> arg_list = expect(args, PyKind::Tuple, "REDUCE arguments").items;
        push(call(name, arg_list, args));
        break;
      }
      case 0x81: {  // NEWOBJ: cls.__new__(cls, *args)
        const PyRef args = pop();
        const PyRef cls = pop();
        push(new_object(expect(cls, PyKind::Global, "NEWOBJ class").str, args));
        break;
      }
      case 0x92: {  // NEWOBJ_EX
        pop();      // kwargs
        const PyRef args = pop();
        const PyRef cls = pop();
        push(new_object(expect(cls, PyKind::Global, "NEWOBJ_EX class").str, args));
        break;
      }
      case 'o': {  // OBJ: mark, cls, args...
        auto items = pop_to_mark();
        if (items.empty()) fail(position_, "OBJ without a class");
        PyObject args = make(PyKind::Tuple);
        args.items.assign(items.begin() + 1, items.end());
        const PyRef args_ref = objects_.add(std::move(args));
        push(new_object(expect(items[0], PyKind::Global, "OBJ class").str, args_ref));
        break;
      }
      case 'i': {  // INST module\nname\n, mark, args...
        const std::string module = python3_module_name(read_line());
        const std::string name = read_line();
        if (is_denied_global(module, name))
          fail(position_, "disallowed global '" + module + "." + name + "'");
        auto items = pop_to_mark();
        PyObject args = make(PyKind::Tuple);
        args.items = std::move(items);
        const PyRef args_ref = objects_.add(std::move(args));
        push(new_object(module + "." + name, args_ref));
        break;
      }
      case 'b': {
        const PyRef state = pop();
        build(state, top());
        break;
      }
      case 'Q': {
        const PyRef pid = pop();
        persistent(pid);
        break;
      }
      case 'P': {
        const PyRef pid = objects_.add(make_string(PyKind::String, read_line()));
        persistent(pid);
        break;
      }
      default:
        fail(position_ - 1, "unsupported pickle opcode " + describe(op) +
                                " (voken reads what torch.save writes: protocols 2-5 without "
                                "extension codes or out-of-band buffers)");
    }
  }

  PyObject new_object(std::string cls, PyRef args) {  // by value: placeholder() adds objects
    if (cls == "collections.OrderedDict" || cls == "builtins.dict") return make(PyKind::Dict);
    if (cls == "builtins.set") return make(PyKind::Set);
    if (cls == "builtins.list") return make(PyKind::List);
    return placeholder(cls, args);
  }

  void persistent(PyRef pid) {
    if (!persistent_load_) fail(position_, "persistent id without a loader");
    stack_.push_back(persistent_load_(objects_, pid));
  }

  void append(PyRef target, const std::vector<PyRef>& items) {
    PyObject& list = objects_[target];
    if (list.kind != PyKind::List && list.kind != PyKind::Set)
      fail(position_, std::string("APPEND to a ") + py_kind_name(list.kind));
    list.items.insert(list.items.end(), items.begin(), items.end());
  }

  void set_items(PyRef target, const std::vector<PyRef>& items) {
    PyObject& dict = objects_[target];
    if (dict.kind == PyKind::Object) return;  // __setitem__ on a placeholder: nothing to keep
    if (dict.kind != PyKind::Dict) fail(position_, std::string("SETITEM on a ") + py_kind_name(dict.kind));
    // Duplicate keys are kept in order (a later one wins when converted); deduplicating here
    // would cost quadratic time on hostile input.
    for (std::size_t i = 0; i + 1 < items.size(); i += 2) dict.entries.emplace_back(items[i], items[i + 1]);
  }

  const uint8_t* data_;
  std::size_t size_;
  std::size_t position_ = 0;
  const std::string& source_;
  const PersistentLoader& persistent_load_;
  PyObjects objects_;
  std::vector<PyRef> stack_;
  std::vector<std::size_t> marks_;
  std::unordered_map<uint64_t, PyRef> memo_;
};

}  // namespace

Unpickled unpickle(const uint8_t* data, std::size_t size, const std::string& source,
                   const PersistentLoader& persistent_load) {
  return Machine(data, size, source, persistent_load).run();
}

}  // namespace voken::io
