// torch.save checkpoints: the writer/reader round trip for every value kind, a cross-check
// against real torch.load, every kind of malformed or hostile file giving a voken error that
// names the file and the problem, inert placeholders for unknown classes, and a mutation fuzz
// that must never see anything but success or a voken::Error.
#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <functional>
#include <limits>
#include <map>
#include <new>
#include <nlohmann/json.hpp>
#include <random>
#include <typeinfo>

#include "common/test_support.h"
#include "io/mapped_file.h"
#include "io/pickle.h"
#include "io/safetensors.h"
#include "io/tensor_bytes.h"
#include "io/torch_file.h"
#include "io/zip_archive.h"
#include "voken/error.h"

namespace voken::io {
namespace {

using test::TempDir;

// ---------------------------------------------------------------------------------------------
// Helpers

// A tensor of `dtype` holding exactly these bit patterns, so special values (-0, NaN payloads,
// subnormals, infinities) are spelled out rather than produced by arithmetic that may
// canonicalise them.
template <typename Bits>
at::Tensor from_bits(const std::vector<Bits>& bits, at::ScalarType dtype, at::IntArrayRef shape) {
  EXPECT_EQ(c10::elementSize(dtype), sizeof(Bits));
  auto t = at::empty({static_cast<int64_t>(bits.size())}, at::TensorOptions().dtype(dtype));
  std::memcpy(t.data_ptr(), bits.data(), bits.size() * sizeof(Bits));
  return t.reshape(shape);
}

double double_from_bits(uint64_t bits) {
  double d;
  std::memcpy(&d, &bits, sizeof d);
  return d;
}

uint64_t bits_of(double d) {
  uint64_t bits;
  std::memcpy(&bits, &d, sizeof bits);
  return bits;
}

const void* storage_data(const at::Tensor& t) { return t.storage().data(); }

// The tensors and views the round-trip and torch.load tests write. Kept alive by the caller so
// that storage identities (which views share what) stay meaningful.
struct Sample {
  PickleValue tree;
  at::Tensor shared;       // the storage of all "views/*" entries
  at::Tensor bf16_shared;  // the storage of "bf16_views/*", only views of it are pickled
};

Sample make_sample() {
  Sample s;
  using PV = PickleValue;
  const auto f64 = from_bits<uint64_t>({0x0000000000000000ull, 0x8000000000000000ull, 0x3ff8000000000000ull,
                                        0x7ff0000000000000ull, 0xfff0000000000000ull, 0x7ff8000000000001ull,
                                        0xfff4000000000000ull, 0x0000000000000001ull, 0x7fefffffffffffffull},
                                       at::kDouble, {3, 3});
  const auto f32 = from_bits<uint32_t>({0x00000000u, 0x80000000u, 0x3fc00000u, 0x7f800000u, 0xff800000u,
                                        0x7fc00001u, 0x00000001u, 0x7f7fffffu},
                                       at::kFloat, {2, 4});
  const auto f16 =
      from_bits<uint16_t>({0x0000, 0x8000, 0x3c00, 0x7c00, 0xfc00, 0x7e01, 0x0001, 0x7bff}, at::kHalf, {8});
  const auto bf16 = from_bits<uint16_t>({0x0000, 0x8000, 0x3f80, 0x7f80, 0xff80, 0x7fc1, 0x0001, 0x7f7f},
                                        at::kBFloat16, {4, 2});
  const auto i64 = from_bits<int64_t>(
      {std::numeric_limits<int64_t>::min(), -1, 0, 1, int64_t{1} << 40, std::numeric_limits<int64_t>::max()},
      at::kLong, {6});
  const auto i32 = from_bits<int32_t>(
      {std::numeric_limits<int32_t>::min(), -7, 0, 7, 1 << 20, std::numeric_limits<int32_t>::max()}, at::kInt,
      {2, 3});
  const auto i16 = from_bits<int16_t>({-32768, -1, 0, 1, 32767}, at::kShort, {5});
  const auto i8 = from_bits<int8_t>({-128, -1, 0, 1, 127}, at::kChar, {5, 1});
  const auto u8 = at::arange(0, 256, 15, at::kLong).to(at::kByte);
  const auto flags = from_bits<uint8_t>({1, 0, 0, 1, 1, 0}, at::kBool, {2, 3});

  // One storage, many views: voken must write it once and rebuild every view on it.
  s.shared = at::arange(48, at::kFloat).reshape({6, 8}) * 0.5 - 3;
  s.bf16_shared = at::arange(12, at::kFloat).to(at::kBFloat16).reshape({3, 4});

  std::string long_string(300, 'x');  // > 255 bytes: not a SHORT_BINUNICODE
  PV ints = PV::list(
      {PV::of(0), PV::of(1), PV::of(255), PV::of(256), PV::of(65535), PV::of(65536), PV::of(-1), PV::of(-128),
       PV::of(-129), PV::of(std::numeric_limits<int32_t>::max()), PV::of(std::numeric_limits<int32_t>::min()),
       PV::of(int64_t{1} << 31), PV::of(-(int64_t{1} << 31) - 1), PV::of((int64_t{1} << 40) + 3),
       PV::of(std::numeric_limits<int64_t>::max()), PV::of(std::numeric_limits<int64_t>::min())});
  PV floats = PV::list({PV::of(0.0), PV::of(-0.0), PV::of(1.5), PV::of(-2.5e-308), PV::of(1e300),
                        PV::of(std::numeric_limits<double>::infinity()),
                        PV::of(-std::numeric_limits<double>::infinity()),
                        PV::of(double_from_bits(0x7ff8000000000123ull)),  // NaN with a payload
                        PV::of(double_from_bits(1)),                      // smallest subnormal
                        PV::of(0.1)});
  PV strings = PV::list({PV::of(""), PV::of("ascii"), PV::of("ünïcødé ✓ 漢字 🙂"),
                         PV::of("line\nbreak \"quoted\" \\ tab\t"), PV::of(long_string)});

  s.tree = PV::dict({
      {"tensors", PV::dict({{"f64", PV::of(f64)},
                            {"f32", PV::of(f32)},
                            {"f16", PV::of(f16)},
                            {"bf16", PV::of(bf16)},
                            {"i64", PV::of(i64)},
                            {"i32", PV::of(i32)},
                            {"i16", PV::of(i16)},
                            {"i8", PV::of(i8)},
                            {"u8", PV::of(u8)},
                            {"bool", PV::of(flags)}})},
      {"scalar", PV::of(at::scalar_tensor(-2.5, at::kDouble))},
      {"empty", PV::of(at::zeros({0, 3}, at::kFloat))},
      {"views", PV::dict({{"base", PV::of(s.shared)},
                          {"transposed", PV::of(s.shared.t())},
                          {"rows_2_to_4", PV::of(s.shared.slice(0, 2, 5))},                // offset 16
                          {"every_other_column", PV::of(s.shared.slice(1, 0, 8, 2))},      // [:, ::2]
                          {"expanded_row", PV::of(s.shared.select(0, 1).expand({4, 8}))},  // stride 0
                          {"element", PV::of(s.shared.select(0, 2).select(0, 3))}})},      // 0-d view
      {"bf16_views", PV::list({PV::of(s.bf16_shared.slice(0, 1, 3)), PV::of(s.bf16_shared.t())})},
      {"nested", PV::list({PV::tuple({PV::of(1), PV::of("two"), PV::list({})}),
                           PV::dict({{"deep", PV::list({PV::list({PV::tuple({})})})}}), PV::tuple({}),
                           PV::list({PV::none(), PV::list({PV::of(true)})}),
                           PV::tuple({PV::of(at::ones({2}, at::kInt)), PV::dict({})})})},
      {"ints", ints},
      {"floats", floats},
      {"strings", strings},
      {"größe ✓", PV::of("a UTF-8 key")},
      {"none", PV::none()},
      {"true", PV::of(true)},
      {"false", PV::of(false)},
      {"hparams", PV::ns({{"lr", PV::of(1e-3)},
                          {"layers", PV::of(12)},
                          {"name", PV::of("vit-g")},
                          {"flags", PV::list({PV::of(true), PV::of(false)})},
                          {"inner", PV::ns({{"seed", PV::of(42)}})},
                          {"empty_ns", PV::ns({})},
                          {"table", PV::dict({{"a", PV::of(1)}})}})},
  });
  return s;
}

// Compares a loaded object tree with the value that was written, bit for bit, naming the path
// of the first difference. The expected side is a finite tree, so recursion terminates even if
// the loaded side were cyclic.
::testing::AssertionResult same_value(const PyObjects& objects, PyRef ref, const PickleValue& want,
                                      const std::string& path) {
  using Kind = PickleValue::Kind;
  const PyObject& got = objects[ref];
  auto fail = [&](const std::string& what) {
    return ::testing::AssertionFailure() << (path.empty() ? "<root>" : path) << ": " << what;
  };
  auto expect_kind = [&](PyKind kind) { return got.kind == kind; };
  auto kind_error = [&](PyKind kind) {
    return fail(std::string("expected ") + py_kind_name(kind) + ", got " + py_kind_name(got.kind));
  };
  auto same_entries = [&](const std::vector<std::pair<PyRef, PyRef>>& entries) -> ::testing::AssertionResult {
    if (entries.size() != want.entries.size())
      return fail("expected " + std::to_string(want.entries.size()) + " entries, got " +
                  std::to_string(entries.size()));
    for (std::size_t i = 0; i < entries.size(); ++i) {
      const PyObject& key = objects[entries[i].first];
      if (key.kind != PyKind::String || key.str != want.entries[i].first)
        return fail("entry " + std::to_string(i) + " has key '" + key.str + "', expected '" +
                    want.entries[i].first + "'");
      auto r = same_value(objects, entries[i].second, want.entries[i].second, path + "/" + key.str);
      if (!r) return r;
    }
    return ::testing::AssertionSuccess();
  };
  switch (want.kind) {
    case Kind::None:
      return expect_kind(PyKind::None) ? ::testing::AssertionSuccess() : kind_error(PyKind::None);
    case Kind::Bool:
      if (!expect_kind(PyKind::Bool)) return kind_error(PyKind::Bool);
      if (got.boolean != want.boolean) return fail("bool differs");
      return ::testing::AssertionSuccess();
    case Kind::Int:
      if (!expect_kind(PyKind::Int)) return kind_error(PyKind::Int);
      if (got.integer != want.integer)
        return fail("expected " + std::to_string(want.integer) + ", got " + std::to_string(got.integer));
      return ::testing::AssertionSuccess();
    case Kind::Float:
      if (!expect_kind(PyKind::Float)) return kind_error(PyKind::Float);
      if (bits_of(got.real) != bits_of(want.real)) return fail("float bits differ");
      return ::testing::AssertionSuccess();
    case Kind::String:
      if (!expect_kind(PyKind::String)) return kind_error(PyKind::String);
      if (got.str != want.str) return fail("expected '" + want.str + "', got '" + got.str + "'");
      return ::testing::AssertionSuccess();
    case Kind::List:
    case Kind::Tuple: {
      const PyKind kind = want.kind == Kind::List ? PyKind::List : PyKind::Tuple;
      if (!expect_kind(kind)) return kind_error(kind);
      if (got.items.size() != want.items.size()) return fail("length differs");
      for (std::size_t i = 0; i < got.items.size(); ++i) {
        auto r = same_value(objects, got.items[i], want.items[i], path + "/" + std::to_string(i));
        if (!r) return r;
      }
      return ::testing::AssertionSuccess();
    }
    case Kind::Dict:
      if (!expect_kind(PyKind::Dict)) return kind_error(PyKind::Dict);
      return same_entries(got.entries);
    case Kind::Namespace: {
      // NEWOBJ argparse.Namespace + BUILD: a placeholder {args = (), state = attribute dict}.
      if (!expect_kind(PyKind::Object)) return kind_error(PyKind::Object);
      if (got.str != "argparse.Namespace") return fail("class " + got.str);
      if (got.items.size() != 2) return fail("placeholder without {args, state}");
      const PyObject& args = objects[got.items[0]];
      if (args.kind != PyKind::Tuple || !args.items.empty()) return fail("Namespace args are not ()");
      const PyObject& state = objects[got.items[1]];
      if (state.kind != PyKind::Dict) return fail("Namespace state is not a dict");
      return same_entries(state.entries);
    }
    case Kind::Tensor: {
      if (!expect_kind(PyKind::Tensor)) return kind_error(PyKind::Tensor);
      auto r = test::bit_equal(got.tensor, want.tensor);
      if (!r) return fail(r.message());
      // Non-empty tensors keep their exact layout (empty ones have no storage to lay out).
      if (want.tensor.numel() > 0 && (!got.tensor.strides().equals(want.tensor.strides()) ||
                                      got.tensor.storage_offset() != want.tensor.storage_offset()))
        return fail("layout differs: stride " + shape_string(got.tensor.strides()) + " offset " +
                    std::to_string(got.tensor.storage_offset()) + ", expected stride " +
                    shape_string(want.tensor.strides()) + " offset " +
                    std::to_string(want.tensor.storage_offset()));
      return ::testing::AssertionSuccess();
    }
  }
  return fail("unknown kind");
}

// Follows dict keys (and list indices written as numbers) from the root.
const PyObject& object_at(const Unpickled& p, const std::vector<std::string>& path) {
  PyRef ref = p.root;
  for (const auto& step : path) {
    const PyObject& o = p.objects[ref];
    if (o.kind == PyKind::List || o.kind == PyKind::Tuple) {
      ref = o.items.at(std::stoul(step));
    } else {
      ref = p.objects.find_ref(ref, step);
      if (ref == PyObjects::kNone) throw std::runtime_error("no key " + step);
    }
  }
  return p.objects[ref];
}

const at::Tensor& tensor_at(const Unpickled& p, const std::vector<std::string>& path) {
  const PyObject& o = object_at(p, path);
  if (o.kind != PyKind::Tensor) throw std::runtime_error("not a tensor");
  return o.tensor;
}

// Builds a zip like torch.save's from (name, bytes) records, in order, and returns its bytes.
std::string zip_bytes(const std::vector<std::pair<std::string, std::string>>& records) {
  TempDir dir;
  ZipWriter zip(dir.file("z.zip"));
  for (const auto& [name, bytes] : records) zip.add(name, bytes.data(), bytes.size());
  zip.finish();
  return test::read_file(dir.file("z.zip"));
}

// The usual torch.save layout around a hand-made pickle and storage records "archive/data/<k>".
std::string torch_zip(const std::string& pickle,
                      const std::vector<std::pair<std::string, std::string>>& storages = {}) {
  std::vector<std::pair<std::string, std::string>> records{{"archive/data.pkl", pickle}};
  for (const auto& [key, bytes] : storages) records.emplace_back("archive/data/" + key, bytes);
  records.emplace_back("archive/version", "3\n");
  return zip_bytes(records);
}

std::string float_bytes(const std::vector<float>& values) {
  return std::string(reinterpret_cast<const char*>(values.data()), values.size() * sizeof(float));
}

// Hand-assembled pickles, opcode by opcode, so each test shows exactly what the unpickler gets.
class Pickle {
 public:
  explicit Pickle(int protocol = 2) {
    op(0x80);
    op(protocol);
  }
  Pickle& op(int code) {
    bytes_.push_back(static_cast<char>(code));
    return *this;
  }
  Pickle& raw(const std::string& s) {
    bytes_ += s;
    return *this;
  }
  Pickle& le(uint64_t value, int n) {
    for (int i = 0; i < n; ++i) bytes_.push_back(static_cast<char>((value >> (8 * i)) & 0xff));
    return *this;
  }
  Pickle& global(const std::string& module, const std::string& name) {  // GLOBAL 'c'
    return op('c').raw(module + "\n" + name + "\n");
  }
  Pickle& short_str(const std::string& s) { return op(0x8c).le(s.size(), 1).raw(s); }  // SHORT_BINUNICODE
  Pickle& stack_global(const std::string& module, const std::string& name) {
    return short_str(module).short_str(name).op(0x93);
  }
  Pickle& str(const std::string& s) { return op('X').le(s.size(), 4).raw(s); }  // BINUNICODE
  Pickle& integer(int64_t v) {
    if (v >= 0 && v < 256) return op('K').le(static_cast<uint64_t>(v), 1);
    if (v >= INT32_MIN && v <= INT32_MAX)
      return op('J').le(static_cast<uint32_t>(static_cast<int32_t>(v)), 4);
    return op(0x8a).le(8, 1).le(static_cast<uint64_t>(v), 8);
  }
  Pickle& mark() { return op('('); }
  Pickle& int_tuple(const std::vector<int64_t>& values) {
    mark();
    for (auto v : values) integer(v);
    return op('t');
  }
  Pickle& empty_ordered_dict() { return global("collections", "OrderedDict").op(')').op('R'); }
  // BINPERSID of torch's ('storage', torch.<type>, key, 'cpu', numel).
  Pickle& storage(const std::string& type, const std::string& key, int64_t numel) {
    mark().str("storage").global("torch", type).str(key).str("cpu").integer(numel).op('t');
    return op('Q');
  }
  // torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict()).
  Pickle& tensor(const std::string& type, const std::string& key, int64_t numel, int64_t offset,
                 const std::vector<int64_t>& sizes, const std::vector<int64_t>& strides) {
    global("torch._utils", "_rebuild_tensor_v2").mark();
    storage(type, key, numel).integer(offset).int_tuple(sizes).int_tuple(strides).op(0x89);
    empty_ordered_dict();
    return op('t').op('R');
  }
  std::string stop() const { return bytes_ + "."; }
  const std::string& unfinished() const { return bytes_; }  // no STOP: a truncated pickle

 private:
  std::string bytes_;
};

// A pickle of one float tensor over storage "0" that holds 4 floats.
std::string one_tensor_zip(int64_t numel, int64_t offset, const std::vector<int64_t>& sizes,
                           const std::vector<int64_t>& strides, const std::string& type = "FloatStorage") {
  return torch_zip(Pickle().tensor(type, "0", numel, offset, sizes, strides).stop(),
                   {{"0", float_bytes({1, 2, 3, 4})}});
}

// Loads a pickle wrapped in a valid torch zip.
TorchFile load_pickle(const TempDir& dir, const std::string& pickle,
                      const std::vector<std::pair<std::string, std::string>>& storages = {}) {
  const std::string path = dir.file("p.pth");
  test::write_file(path, torch_zip(pickle, storages));
  return load_torch_file(path);
}

// Patches the central-directory entry (and local header) of record `name` with `patch`,
// which gets the absolute offsets of both headers.
std::string patch_record(
    std::string zip, const std::string& name,
    const std::function<void(std::string&, std::size_t central, std::size_t local)>& patch) {
  auto u = [&](std::size_t at, int n) {
    uint64_t v = 0;
    for (int i = n - 1; i >= 0; --i) v = (v << 8) | static_cast<uint8_t>(zip[at + i]);
    return v;
  };
  const std::size_t eocd = zip.rfind(std::string("PK\x05\x06", 4));
  std::size_t pos = u(eocd + 16, 4);
  for (uint64_t i = 0, n = u(eocd + 10, 2); i < n; ++i) {
    const auto name_length = u(pos + 28, 2);
    if (zip.compare(pos + 46, name_length, name) == 0) {
      patch(zip, pos, u(pos + 42, 4));
      return zip;
    }
    pos += 46 + name_length + u(pos + 30, 2) + u(pos + 32, 2);
  }
  throw std::runtime_error("no record " + name);
}

void put_le(std::string& bytes, std::size_t at, uint64_t value, int n) {
  for (int i = 0; i < n; ++i) bytes[at + i] = static_cast<char>((value >> (8 * i)) & 0xff);
}

// Runs `body` in a forked child so that a crash or hang in the code under test fails this one
// test with a diagnosis instead of killing the whole test binary. `body` returns "" on success
// or a failure description, and may record what it is doing in `note` (shared memory, so the
// parent can say which input was being processed when the child died).
struct Shared {
  char note[1024];
  char failure[4096];
  int64_t counters[4];
};

::testing::AssertionResult run_isolated(const std::function<std::string(Shared&)>& body,
                                        unsigned timeout_seconds, Shared* final_state = nullptr) {
  void* memory = ::mmap(nullptr, sizeof(Shared), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (memory == MAP_FAILED) return ::testing::AssertionFailure() << "mmap failed";
  auto* shared = new (memory) Shared{};
  std::fflush(nullptr);
  const pid_t child = ::fork();
  if (child < 0) return ::testing::AssertionFailure() << "fork failed";
  if (child == 0) {
    ::alarm(timeout_seconds);  // a hang becomes SIGALRM, reported below
    std::string failure;
    try {
      failure = body(*shared);
    } catch (const std::exception& e) {
      failure = std::string("escaped exception ") + typeid(e).name() + ": " + e.what();
    } catch (...) {
      failure = "escaped non-std exception";
    }
    std::snprintf(shared->failure, sizeof shared->failure, "%s", failure.c_str());
    ::_exit(failure.empty() ? 0 : 1);
  }
  int status = 0;
  while (::waitpid(child, &status, 0) < 0 && errno == EINTR) {
  }
  ::testing::AssertionResult result = ::testing::AssertionSuccess();
  if (WIFSIGNALED(status)) {
    const int sig = WTERMSIG(status);
    result = ::testing::AssertionFailure()
             << (sig == SIGALRM ? "hung (no result after " + std::to_string(timeout_seconds) + " s)"
                                : std::string("crashed with signal ") + std::to_string(sig) + " (" +
                                      strsignal(sig) + ")")
             << " while: " << shared->note;
  } else if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    result = ::testing::AssertionFailure() << shared->failure << " (while: " << shared->note << ")";
  }
  if (final_state != nullptr) *final_state = *shared;
  ::munmap(memory, sizeof(Shared));
  return result;
}

void note(Shared& shared, const std::string& what) {
  std::snprintf(shared.note, sizeof shared.note, "%s", what.c_str());
}

// ---------------------------------------------------------------------------------------------
// 1. Round trip

TEST(TorchFileRoundTrip, EveryValueKindComesBackBitExactly) {
  TempDir dir;
  const Sample sample = make_sample();
  save_torch_file(dir.file("sample.pth"), sample.tree);
  const TorchFile file = load_torch_file(dir.file("sample.pth"));
  EXPECT_EQ(file.path, dir.file("sample.pth"));
  EXPECT_TRUE(same_value(file.pickle.objects, file.pickle.root, sample.tree, ""));
}

TEST(TorchFileRoundTrip, ViewsOfOneStorageAreWrittenOnceAndShareMemoryWhenLoaded) {
  TempDir dir;
  const Sample sample = make_sample();
  const std::string path = dir.file("sample.pth");
  save_torch_file(path, sample.tree);

  // One record per distinct storage: 10 dtypes + scalar + empty + views + bf16 views + the int
  // tensor in "nested" = 15, however many views point at them.
  std::size_t storage_records = 0;
  for (const auto& record : ZipArchive::open(MappedFile::open(path)).records())
    storage_records += record.name.rfind("sample/data/", 0) == 0;
  EXPECT_EQ(storage_records, 15u);

  const TorchFile file = load_torch_file(path);
  const auto& p = file.pickle;
  const void* shared = storage_data(tensor_at(p, {"views", "base"}));
  for (const char* view : {"transposed", "rows_2_to_4", "every_other_column", "expanded_row", "element"}) {
    const at::Tensor& t = tensor_at(p, {"views", view});
    EXPECT_EQ(storage_data(t), shared) << view;
    EXPECT_EQ(t.storage().unsafeGetStorageImpl(),
              tensor_at(p, {"views", "base"}).storage().unsafeGetStorageImpl())
        << view;
  }
  EXPECT_EQ(tensor_at(p, {"views", "rows_2_to_4"}).storage_offset(), 16);
  EXPECT_EQ(tensor_at(p, {"views", "expanded_row"}).stride(0), 0);
  EXPECT_EQ(tensor_at(p, {"views", "element"}).dim(), 0);
  EXPECT_EQ(storage_data(tensor_at(p, {"bf16_views", "0"})), storage_data(tensor_at(p, {"bf16_views", "1"})));
  // The bf16 views were written with their whole storage (12 elements), not just what they show.
  EXPECT_EQ(tensor_at(p, {"bf16_views", "0"}).storage().nbytes(), 12u * 2);
  // Distinct storages stay distinct.
  EXPECT_NE(storage_data(tensor_at(p, {"tensors", "f32"})), shared);
  EXPECT_NE(storage_data(tensor_at(p, {"tensors", "f32"})), storage_data(tensor_at(p, {"tensors", "f64"})));

  // Writing through one view is visible through the others: they really alias.
  at::Tensor base = tensor_at(p, {"views", "base"});
  base[1][3].fill_(1234.5);
  EXPECT_EQ(tensor_at(p, {"views", "transposed"})[3][1].item<float>(), 1234.5f);
  EXPECT_EQ(tensor_at(p, {"views", "expanded_row"})[2][3].item<float>(), 1234.5f);
}

TEST(TorchFileRoundTrip, ViewsOfOneStorageWithDifferentDtypesAreRefusedOrKeepTheirDtypes) {
  // x and x.view(int32) share one storage. torch.save refuses this ("Cannot save multiple
  // tensors or storages that view the same data as different types") because a torch file names
  // one storage class per storage key. Writing it anyway must not silently change a dtype.
  TempDir dir;
  const auto x = at::arange(4, at::kFloat);
  const auto bits = x.view(at::kInt);
  try {
    save_torch_state_dict(dir.file("mixed.pth"), {{"f", x}, {"i", bits}});
  } catch (const Error&) {
    return;  // refused like torch.save: fine
  }
  const auto tensors = torch_state_dict(load_torch_file(dir.file("mixed.pth")));
  ASSERT_EQ(tensors.size(), 2u);
  EXPECT_TRUE(test::bit_equal(tensors[0].second, x));
  EXPECT_TRUE(test::bit_equal(tensors[1].second, bits))
      << "the int32 view came back as " << tensors[1].second.scalar_type();
}

TEST(TorchFileRoundTrip, CyclicPicklesLoadWithoutHangingOrCrashing) {
  // A list appended to itself through the memo, and a dict holding itself: pickle can express
  // cycles, so the loader (and torch_state_dict) must not recurse into them.
  const auto verdict = run_isolated(
      [](Shared& shared) -> std::string {
        TempDir dir;
        note(shared, "list appended to itself");
        const auto list = load_pickle(dir, Pickle().op(']').op('q').le(0, 1).op('h').le(0, 1).op('a').stop());
        const PyObject& root = list.pickle.objects[list.pickle.root];
        if (root.kind != PyKind::List || root.items.size() != 1 || root.items[0] != list.pickle.root)
          return "the list does not contain itself";
        note(shared, "dict holding itself, then torch_state_dict");
        const auto dict =
            load_pickle(dir, Pickle().op('}').op('q').le(0, 1).str("self").op('h').le(0, 1).op('s').stop());
        try {
          torch_state_dict(dict);
          return "torch_state_dict found tensors in a dict without any";
        } catch (const WeightsError&) {
        }
        return "";
      },
      20);
  EXPECT_TRUE(verdict);
}

// torch_state_dict on files shaped like the checkpoints voken meets.
TEST(TorchStateDict, RootDictOfTensorsIsTheStateDictInOrder) {
  TempDir dir;
  const auto a = at::arange(6, at::kFloat).reshape({2, 3});
  const auto b = at::ones({4}, at::kBFloat16);
  save_torch_state_dict(dir.file("m.pth"), {{"layer.weight", a}, {"layer.bias", b}, {"z", a.t()}});
  const auto tensors = torch_state_dict(load_torch_file(dir.file("m.pth")));
  ASSERT_EQ(tensors.size(), 3u);
  EXPECT_EQ(tensors[0].first, "layer.weight");
  EXPECT_EQ(tensors[1].first, "layer.bias");
  EXPECT_EQ(tensors[2].first, "z");
  EXPECT_TRUE(test::bit_equal(tensors[0].second, a));
  EXPECT_TRUE(test::bit_equal(tensors[1].second, b));
  EXPECT_TRUE(test::bit_equal(tensors[2].second, a.t()));
}

TEST(TorchStateDict, LightningCheckpointUsesStateDictAndSkipsNonTensors) {
  TempDir dir;
  using PV = PickleValue;
  const auto w = at::arange(4, at::kFloat);
  save_torch_file(dir.file("last.ckpt"),
                  PV::dict({{"epoch", PV::of(3)},
                            {"global_step", PV::of(1000)},
                            {"model", PV::dict({{"decoy", PV::of(at::zeros({1}))}})},
                            {"state_dict", PV::dict({{"net.w", PV::of(w)}, {"version", PV::of(2)}})},
                            {"hyper_parameters", PV::ns({{"lr", PV::of(0.1)}})}}));
  const auto tensors = torch_state_dict(load_torch_file(dir.file("last.ckpt")));
  ASSERT_EQ(tensors.size(), 1u);  // "state_dict" wins over "model"; the int is skipped
  EXPECT_EQ(tensors[0].first, "net.w");
  EXPECT_TRUE(test::bit_equal(tensors[0].second, w));
}

TEST(TorchStateDict, ModelKeyIsUsedWhenThereIsNoStateDict) {
  TempDir dir;
  using PV = PickleValue;
  const auto w = at::arange(3, at::kLong);
  save_torch_file(
      dir.file("minigpt.pth"),
      PV::dict({{"optimizer", PV::dict({})}, {"model", PV::dict({{"llama_proj.weight", PV::of(w)}})}}));
  const auto tensors = torch_state_dict(load_torch_file(dir.file("minigpt.pth")));
  ASSERT_EQ(tensors.size(), 1u);
  EXPECT_EQ(tensors[0].first, "llama_proj.weight");
  EXPECT_TRUE(test::bit_equal(tensors[0].second, w));
}

TEST(TorchStateDict, ExplicitInnerKeyOverridesTheAutomaticChoice) {
  TempDir dir;
  using PV = PickleValue;
  const auto ema = at::full({2}, 7.0);
  save_torch_file(dir.file("ema.ckpt"), PV::dict({{"state_dict", PV::dict({{"w", PV::of(at::zeros({2}))}})},
                                                  {"ema", PV::dict({{"w", PV::of(ema)}})}}));
  const auto file = load_torch_file(dir.file("ema.ckpt"));
  const auto tensors = torch_state_dict(file, "ema");
  ASSERT_EQ(tensors.size(), 1u);
  EXPECT_TRUE(test::bit_equal(tensors[0].second, ema));
  try {
    torch_state_dict(file, "missing");
    FAIL() << "no exception";
  } catch (const WeightsError& e) {
    const std::string message = e.what();
    EXPECT_NE(message.find(dir.file("ema.ckpt")), std::string::npos) << message;
    EXPECT_NE(message.find("'missing'"), std::string::npos) << message;
    EXPECT_NE(message.find("state_dict, ema"), std::string::npos) << message;
  }
}

TEST(TorchStateDict, NoStateDictListsTheTopLevelKeys) {
  TempDir dir;
  using PV = PickleValue;
  save_torch_file(dir.file("cfg.pth"),
                  PV::dict({{"epoch", PV::of(1)}, {"config", PV::dict({{"lr", PV::of(0.5)}})}}));
  try {
    torch_state_dict(load_torch_file(dir.file("cfg.pth")));
    FAIL() << "no exception";
  } catch (const WeightsError& e) {
    const std::string message = e.what();
    EXPECT_NE(message.find(dir.file("cfg.pth")), std::string::npos) << message;
    EXPECT_NE(message.find("top-level keys: epoch, config"), std::string::npos) << message;
  }
  // A root that is not a dict says so instead of listing keys.
  save_torch_file(dir.file("list.pth"), PV::list({PV::of(at::ones({1}))}));
  try {
    torch_state_dict(load_torch_file(dir.file("list.pth")));
    FAIL() << "no exception";
  } catch (const WeightsError& e) {
    EXPECT_NE(std::string(e.what()).find("root is a list"), std::string::npos) << e.what();
  }
}

// ---------------------------------------------------------------------------------------------
// 2. Cross-check with real torch

// Describes `v` for check_torch_load.py and collects the expected tensors under their paths.
nlohmann::json torch_spec(const PickleValue& v, const std::string& path,
                          std::vector<std::pair<std::string, at::Tensor>>& tensors,
                          std::map<const void*, int>& groups) {
  using Kind = PickleValue::Kind;
  using nlohmann::json;
  auto entries = [&](const char* kind) {
    json items = json::array();
    for (const auto& [key, item] : v.entries)
      items.push_back({key, torch_spec(item, path + "/" + key, tensors, groups)});
    return json{{"t", kind}, {"v", items}};
  };
  switch (v.kind) {
    case Kind::None:
      return {{"t", "none"}};
    case Kind::Bool:
      return {{"t", "bool"}, {"v", v.boolean}};
    case Kind::Int:
      return {{"t", "int"}, {"v", v.integer}};
    case Kind::Float: {
      char hex[17];
      std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(bits_of(v.real)));
      return {{"t", "float"}, {"bits", hex}};
    }
    case Kind::String:
      return {{"t", "str"}, {"v", v.str}};
    case Kind::List:
    case Kind::Tuple: {
      json items = json::array();
      for (std::size_t i = 0; i < v.items.size(); ++i)
        items.push_back(torch_spec(v.items[i], path + "/" + std::to_string(i), tensors, groups));
      return {{"t", v.kind == Kind::List ? "list" : "tuple"}, {"v", items}};
    }
    case Kind::Dict:
      return entries("dict");
    case Kind::Namespace:
      return entries("namespace");
    case Kind::Tensor: {
      tensors.emplace_back(path, v.tensor);
      json group = nullptr;  // empty storages have no address to compare
      if (v.tensor.storage().nbytes() > 0)
        group = groups.emplace(v.tensor.storage().unsafeGetStorageImpl(), static_cast<int>(groups.size()))
                    .first->second;
      return {{"t", "tensor"},
              {"name", path},
              {"stride", v.tensor.strides().vec()},
              {"offset", v.tensor.storage_offset()},
              {"group", group}};
    }
  }
  return nullptr;
}

TEST(TorchFileCrossCheck, RealTorchLoadReadsWhatVokenWrites) {
  if (test::run_python("-c 'import torch, numpy' >/dev/null 2>&1") != 0)
    GTEST_SKIP() << "python3 cannot import torch and numpy; skipping the torch.load cross-check";
  TempDir dir;
  const Sample sample = make_sample();
  const std::string checkpoint = dir.file("sample.pth");
  const std::string expected = dir.file("expected.safetensors");
  save_torch_file(checkpoint, sample.tree);
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  std::map<const void*, int> groups;
  const auto spec = torch_spec(sample.tree, "", tensors, groups);
  write_safetensors(expected, tensors, {{"voken_spec", spec.dump()}});
  const std::string script = std::string(VOKEN_SOURCE_DIR) + "/tests/fixtures/check_torch_load.py";
  EXPECT_EQ(test::run_python("'" + script + "' '" + checkpoint + "' '" + expected + "'"), 0)
      << "torch.load disagrees with what voken wrote; see check_torch_load's output above";
}

// ---------------------------------------------------------------------------------------------
// 3. Bad input

// A valid checkpoint of a few KB, for truncation.
std::string valid_file() {
  TempDir dir;
  save_torch_state_dict(dir.file("v.pth"), {{"a", at::arange(256, at::kFloat)},
                                            {"b", at::arange(512, at::kShort)},
                                            {"c", at::ones({3, 3}, at::kDouble)}});
  return test::read_file(dir.file("v.pth"));
}

std::string cut(double fraction) {
  const std::string bytes = valid_file();
  return bytes.substr(0, static_cast<std::size_t>(static_cast<double>(bytes.size()) * fraction));
}

// A pickle that references a global through GLOBAL or STACK_GLOBAL and calls it, like an
// exploit would: the reference alone must already be refused.
std::string calls_global(const std::string& module, const std::string& name, bool stack_global) {
  Pickle p;
  if (stack_global)
    p.stack_global(module, name);
  else
    p.global(module, name);
  return torch_zip(p.mark().str("echo pwned").op('t').op('R').stop());
}

struct BadCase {
  std::string name;
  std::function<std::string()> bytes;
  std::string expected_in_message;
};

void PrintTo(const BadCase& c, std::ostream* out) { *out << c.name; }

class TorchFileBadInput : public ::testing::TestWithParam<BadCase> {};

TEST_P(TorchFileBadInput, GivesFormatErrorNamingFileAndProblem) {
  TempDir dir;
  const std::string path = dir.file(GetParam().name + ".pth");
  test::write_file(path, GetParam().bytes());
  try {
    load_torch_file(path);
    FAIL() << "no exception for " << GetParam().name;
  } catch (const FormatError& e) {
    const std::string message = e.what();
    EXPECT_NE(message.find(path), std::string::npos) << message;
    EXPECT_NE(message.find(GetParam().expected_in_message), std::string::npos) << message;
  }
}

std::vector<BadCase> bad_cases() {
  const std::string legacy_magic("\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19", 14);
  std::vector<BadCase> cases = {
      // Files that are not (whole) torch zips.
      {"legacy", [=] { return legacy_magic + "\x71\x00}q\x01(anything"; }, "legacy"},
      {"not_a_zip", [] { return std::string("this is a text file, not a checkpoint\n"); },
       "no zip signature"},
      {"empty", [] { return std::string(); }, "no zip signature"},
      {"cut_at_10_percent", [] { return cut(0.1); }, "truncated"},
      {"cut_at_50_percent", [] { return cut(0.5); }, "truncated"},
      {"cut_at_90_percent", [] { return cut(0.9); }, "truncated"},
      {"cut_last_byte",
       [] {
         const auto b = valid_file();
         return b.substr(0, b.size() - 1);
       },
       "truncated"},
      {"zip_header_only", [] { return std::string("PK\x03\x04", 4); }, "too short"},
      {"record_size_past_end",
       [] {
         return patch_record(torch_zip(Pickle().op('N').stop()), "archive/data.pkl",
                             [](std::string& z, std::size_t central, std::size_t) {
                               put_le(z, central + 20, 0x7fffffff, 4);
                               put_le(z, central + 24, 0x7fffffff, 4);
                             });
       },
       "runs past the end of the file"},
      {"directory_offset_past_end",
       [] {
         std::string z = torch_zip(Pickle().op('N').stop());
         put_le(z, z.size() - 22 + 16, 0x7ffffff0, 4);
         return z;
       },
       "does not fit the file"},
      {"compressed_record",
       [] {
         // Deflate (method 8) in both headers, as a re-zipped checkpoint would have.
         return patch_record(one_tensor_zip(4, 0, {4}, {1}), "archive/data/0",
                             [](std::string& z, std::size_t central, std::size_t local) {
                               put_le(z, central + 10, 8, 2);
                               put_le(z, local + 8, 8, 2);
                             });
       },
       "'archive/data/0' is compressed (method 8)"},
      {"data_pkl_missing",
       [] {
         return zip_bytes({{"archive/data/0", float_bytes({1})}, {"archive/version", "3\n"}});
       },
       "without a <name>/data.pkl"},
      {"torchscript_archive",
       [] {
         return zip_bytes({{"archive/constants.pkl", "\x80\x02)."}, {"archive/code/m.py", "x"}});
       },
       "TorchScript"},
      {"big_endian_storages",
       [] {
         return zip_bytes({{"archive/data.pkl", Pickle().op('N').stop()}, {"archive/byteorder", "big"}});
       },
       "'big' byte order"},
      // Storages and tensors that do not fit.
      {"storage_record_missing",
       [] { return torch_zip(Pickle().tensor("FloatStorage", "0", 4, 0, {4}, {1}).stop()); },
       "storage record 'archive/data/0' is missing"},
      {"storage_larger_than_record", [] { return one_tensor_zip(100, 0, {100}, {1}); },
       "declares 100 FloatStorage elements but its record holds 16 bytes"},
      {"storage_negative_numel", [] { return one_tensor_zip(-1, 0, {1}, {1}); }, "bad element count"},
      {"size_past_storage", [] { return one_tensor_zip(4, 0, {5}, {1}); },
       "addresses elements past the storage"},
      {"stride_past_storage", [] { return one_tensor_zip(4, 0, {2}, {4}); },
       "addresses elements past the storage"},
      {"offset_past_storage", [] { return one_tensor_zip(4, 4, {}, {}); },
       "addresses elements past the storage"},
      {"offset_plus_size_past_storage",
       [] {
         return one_tensor_zip(4, 2, {2, 2}, {1, 1});
       },
       "addresses elements past the storage"},
      {"negative_stride", [] { return one_tensor_zip(4, 3, {4}, {-1}); }, "negative size or stride"},
      {"negative_size", [] { return one_tensor_zip(4, 0, {-4}, {1}); }, "negative size or stride"},
      {"negative_offset", [] { return one_tensor_zip(4, -1, {1}, {1}); }, "negative offset"},
      {"size_stride_rank_mismatch",
       [] {
         return one_tensor_zip(4, 0, {2, 2}, {2});
       },
       "ranks differ"},
      {"extent_overflows_int64",
       [] {
         return one_tensor_zip(4, 0, {int64_t{1} << 62, 3}, {int64_t{1} << 62, 1});
       },
       "extent overflows"},
      {"unknown_persistent_id",
       [] { return torch_zip(Pickle().mark().str("module").str("x").op('t').op('Q').stop()); },
       "unsupported persistent id"},
      {"text_persistent_id", [] { return torch_zip(Pickle().op('P').raw("0\n").stop()); },
       "unsupported persistent id"},
      {"unknown_storage_type", [] { return one_tensor_zip(2, 0, {2}, {1}, "ComplexFloatStorage"); },
       "unsupported storage type 'torch.ComplexFloatStorage'"},
      {"tensor_without_storage",
       [] {
         return torch_zip(Pickle()
                              .global("torch._utils", "_rebuild_tensor_v2")
                              .mark()
                              .op('N')
                              .integer(0)
                              .int_tuple({1})
                              .int_tuple({1})
                              .op('t')
                              .op('R')
                              .stop());
       },
       "expected storage, got None"},
      // Pickles the VM must refuse.
      {"ext1_opcode", [] { return torch_zip(Pickle().op(0x82).le(1, 1).stop()); },
       "unsupported pickle opcode 0x82"},
      {"protocol_6", [] { return torch_zip(Pickle(6).op('N').stop()); }, "unsupported pickle protocol 6"},
      {"pickle_without_stop", [] { return torch_zip(Pickle().op('N').unfinished()); }, "truncated pickle"},
      {"pickle_cut_inside_string",
       [] { return torch_zip(Pickle().op('X').le(16, 4).raw("abc").unfinished()); },
       "runs past the end of the pickle"},
      {"pickle_cut_inside_int", [] { return torch_zip(Pickle().op('J').raw("\x01\x02").unfinished()); },
       "truncated pickle"},
      {"stack_underflow_append", [] { return torch_zip(Pickle().op('a').stop()); }, "stack underflow"},
      {"stack_underflow_pop", [] { return torch_zip(Pickle().op('0').stop()); }, "stack underflow"},
      {"stack_underflow_below_mark", [] { return torch_zip(Pickle().op('N').mark().op(0x85).stop()); },
       "stack underflow"},
      {"appends_without_mark", [] { return torch_zip(Pickle().op(']').integer(1).op('e').stop()); },
       "no MARK"},
      {"memo_get_missing", [] { return torch_zip(Pickle().op('h').le(7, 1).stop()); },
       "memo key 7 not found"},
      {"long_binget_missing", [] { return torch_zip(Pickle().op('N').op('j').le(123456, 4).stop()); },
       "memo key 123456 not found"},
      {"stop_with_two_values", [] { return torch_zip(Pickle().op('N').op('N').stop()); },
       "STOP with 2 values"},
      {"empty_pickle", [] { return torch_zip(Pickle().stop()); }, "STOP with 0 values"},
      // Lengths far beyond the file: refused before anything that size is allocated.
      {"long4_huge", [] { return torch_zip(Pickle().op(0x8b).le(0x7fffffff, 4).stop()); },
       "does not fit int64"},
      {"binunicode_huge", [] { return torch_zip(Pickle().op('X').le(0xfffffff0u, 4).stop()); },
       "runs past the end of the pickle"},
      {"binunicode8_huge", [] { return torch_zip(Pickle(4).op(0x8d).le(uint64_t{1} << 62, 8).stop()); },
       "runs past the end of the pickle"},
      {"binbytes8_huge", [] { return torch_zip(Pickle(4).op(0x8e).le(~uint64_t{0}, 8).stop()); },
       "runs past the end of the pickle"},
      {"binbytes_huge", [] { return torch_zip(Pickle(3).op('B').le(0xffffffffu, 4).stop()); },
       "runs past the end of the pickle"},
      {"long1_nine_bytes",
       [] { return torch_zip(Pickle().op(0x8a).le(9, 1).raw(std::string(9, '\x01')).stop()); },
       "integer of 9 bytes does not fit int64"},
      {"long4_nine_bytes",
       [] { return torch_zip(Pickle().op(0x8b).le(9, 4).raw(std::string(9, '\x01')).stop()); },
       "integer of 9 bytes does not fit int64"},
      {"text_int_overflow",
       [] { return torch_zip(Pickle().op('L').raw("123456789012345678901234567890L\n").stop()); },
       "bad integer"},
  };
  // Globals that could run code if this were a real unpickler, through both opcodes.
  const std::pair<const char*, const char*> denied[] = {{"os", "system"},
                                                        {"posix", "system"},
                                                        {"builtins", "eval"},
                                                        {"builtins", "getattr"},
                                                        {"subprocess", "Popen"},
                                                        {"torch", "load"},
                                                        {"__builtin__", "exec"},
                                                        {"nt", "system"},
                                                        {"os.path", "join"},
                                                        {"torch.jit", "load"},
                                                        {"torch._utils", "_load_from_bytes_x"}};
  for (const auto& global : denied) {
    // Plain copies: the lambdas outlive `denied`.
    const std::string module = global.first;
    const std::string name = global.second;
    std::string id = module + "_" + name;
    for (char& c : id)
      if (c == '.') c = '_';
    // Python 2 module names are renamed first, as Python 3's unpickler does (__builtin__ ->
    // builtins), so the message names the Python 3 module.
    const std::string python3_module = module == "__builtin__" ? "builtins" : module;
    const std::string qualified = "disallowed global '" + python3_module + "." + name + "'";
    cases.push_back({"GLOBAL_" + id, [=] { return calls_global(module, name, false); }, qualified});
    cases.push_back({"STACK_GLOBAL_" + id, [=] { return calls_global(module, name, true); }, qualified});
  }
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Cases, TorchFileBadInput, ::testing::ValuesIn(bad_cases()),
                         [](const auto& info) { return info.param.name; });

TEST(TorchFileBadInputExtra, MissingFileIsFileNotFound) {
  EXPECT_THROW(load_torch_file("/nonexistent/dir/model.pth"), FileNotFoundError);
}

TEST(TorchFileBadInputExtra, TorchScriptArchiveWithDataPklIsRefused) {
  // What torch.jit.save really writes (torch 1.13): a data.pkl of __torch__.* module objects
  // next to code/ and constants.pkl. The loader documents a FormatError for TorchScript
  // archives; it must not hand back a tree of inert __torch__ placeholders instead.
  TempDir dir;
  const std::string path = dir.file("scripted.pt");
  const std::string pickle = Pickle()
                                 .global("__torch__", "M")
                                 .op(')')
                                 .op(0x81)
                                 .op('}')
                                 .str("training")
                                 .op(0x88)
                                 .op('s')
                                 .op('b')
                                 .stop();
  test::write_file(path, zip_bytes({{"scripted/data.pkl", pickle},
                                    {"scripted/code/__torch__.py", "class M(Module):\n  pass\n"},
                                    {"scripted/constants.pkl", Pickle().op(')').stop()},
                                    {"scripted/version", "3\n"}}));
  try {
    load_torch_file(path);
    FAIL() << "a TorchScript archive loaded as if it were a torch.save checkpoint";
  } catch (const FormatError& e) {
    const std::string message = e.what();
    EXPECT_NE(message.find(path), std::string::npos) << message;
    EXPECT_NE(message.find("TorchScript"), std::string::npos) << message;
  }
}

TEST(TorchFileBadInputExtra, HugeDeclaredLengthsAreRefusedWithoutAllocating) {
  // Peak RSS may not grow by anything near the lengths these pickles declare (2-16 EiB/GiB).
  TempDir dir;
  rusage before{};
  ::getrusage(RUSAGE_SELF, &before);
  const std::string pickles[] = {
      Pickle().op(0x8b).le(0x7fffffff, 4).stop(), Pickle().op('X').le(0xffffffffu, 4).stop(),
      Pickle(4).op(0x8e).le(uint64_t{1} << 40, 8).stop(), Pickle(4).op(0x8d).le(uint64_t{1} << 40, 8).stop()};
  for (const auto& pickle : pickles) EXPECT_THROW(load_pickle(dir, pickle), FormatError);
  rusage after{};
  ::getrusage(RUSAGE_SELF, &after);
  EXPECT_LT(after.ru_maxrss - before.ru_maxrss, 256 * 1024)
      << "peak RSS grew by " << after.ru_maxrss - before.ru_maxrss << " KiB";
}

TEST(TorchFileBadInputExtra, DeeplyNestedRebuildFromTypeDoesNotOverflowTheStack) {
  // torch._tensor._rebuild_from_type_v2(func, type, args, state) unwraps a tensor subclass by
  // calling func(*args); a hostile file can nest it a million levels deep in 4 MB:
  //   (G N (G N (G N ... () ...))) built as "(" h0 "N" repeated, then ")" and "t" repeated.
  // Real checkpoints nest it once. Loading must fail cleanly (or succeed), not crash.
  const auto verdict = run_isolated(
      [](Shared& shared) -> std::string {
        constexpr int kDepth = 1000000;
        Pickle p;
        p.global("torch._tensor", "_rebuild_from_type_v2").op('q').le(0, 1);
        std::string levels;
        for (int i = 0; i < kDepth; ++i) levels += std::string("(h\x00N", 4);
        p.raw(levels).op(')').raw(std::string(kDepth, 't')).op('R');
        TempDir dir;
        note(shared, "loading a 1,000,000-deep _rebuild_from_type_v2 chain");
        try {
          load_pickle(dir, p.stop());
          return "a chain ending in () loaded without error";
        } catch (const Error&) {
        }
        return "";
      },
      60);
  EXPECT_TRUE(verdict);
}

// ---------------------------------------------------------------------------------------------
// 4. Unknown classes and the allow-listed reconstructors

TEST(TorchFilePlaceholders, NamespaceViaNewobjKeepsClassArgsAndState) {
  TempDir dir;
  const auto f = load_pickle(dir, Pickle()
                                      .global("argparse", "Namespace")
                                      .op(')')
                                      .op(0x81)  // NEWOBJ
                                      .op('}')
                                      .str("lr")
                                      .integer(3)
                                      .op('s')
                                      .op('b')  // BUILD
                                      .stop());
  const auto& o = f.pickle.objects;
  const PyObject& ns = o[f.pickle.root];
  ASSERT_EQ(ns.kind, PyKind::Object);
  EXPECT_EQ(ns.str, "argparse.Namespace");
  ASSERT_EQ(ns.items.size(), 2u);
  EXPECT_EQ(o[ns.items[0]].kind, PyKind::Tuple);
  EXPECT_TRUE(o[ns.items[0]].items.empty());
  ASSERT_NE(o.find(ns.items[1], "lr"), nullptr);
  EXPECT_EQ(o.find(ns.items[1], "lr")->integer, 3);
}

TEST(TorchFilePlaceholders, PosixPathViaReduceKeepsItsArguments) {
  TempDir dir;
  const auto f = load_pickle(
      dir, Pickle().global("pathlib", "PosixPath").mark().str("/data").str("ckpt").op('t').op('R').stop());
  const auto& o = f.pickle.objects;
  const PyObject& path = o[f.pickle.root];
  ASSERT_EQ(path.kind, PyKind::Object);
  EXPECT_EQ(path.str, "pathlib.PosixPath");
  const PyObject& args = o[path.items[0]];
  ASSERT_EQ(args.kind, PyKind::Tuple);
  ASSERT_EQ(args.items.size(), 2u);
  EXPECT_EQ(o[args.items[0]].str, "/data");
  EXPECT_EQ(o[args.items[1]].str, "ckpt");
  EXPECT_EQ(o[path.items[1]].kind, PyKind::None);  // no BUILD: no state
}

TEST(TorchFilePlaceholders, Python313PathlibLocalPathIsAnInertPlaceholderToo) {
  // Python 3.13 defines the path classes in pathlib._local, so a checkpoint pickled there (e.g.
  // a Lightning hyper_parameters entry holding a Path) names pathlib._local.PosixPath. It is the
  // same harmless class as pathlib.PosixPath and must load as the same kind of placeholder.
  TempDir dir;
  const auto f = load_pickle(
      dir, Pickle().global("pathlib._local", "PosixPath").mark().str("/data").op('t').op('R').stop());
  const PyObject& path = f.pickle.objects[f.pickle.root];
  ASSERT_EQ(path.kind, PyKind::Object);
  EXPECT_EQ(path.str, "pathlib._local.PosixPath");
}

TEST(TorchFilePlaceholders, CopyregReconstructorNamesTheReconstructedClass) {
  // Protocol 0/1 style: copyreg._reconstructor(cls, object, None) then BUILD with __dict__.
  TempDir dir;
  const auto f = load_pickle(dir, Pickle()
                                      .global("copyreg", "_reconstructor")
                                      .mark()
                                      .global("mymodule.config", "TrainConfig")
                                      .global("builtins", "object")
                                      .op('N')
                                      .op('t')
                                      .op('R')
                                      .op('}')
                                      .str("epochs")
                                      .integer(90)
                                      .op('s')
                                      .op('b')
                                      .stop());
  const auto& o = f.pickle.objects;
  const PyObject& obj = o[f.pickle.root];
  ASSERT_EQ(obj.kind, PyKind::Object);
  EXPECT_EQ(obj.str, "mymodule.config.TrainConfig");
  EXPECT_EQ(o[obj.items[0]].kind, PyKind::Tuple);
  ASSERT_NE(o.find(obj.items[1], "epochs"), nullptr);
  EXPECT_EQ(o.find(obj.items[1], "epochs")->integer, 90);
}

TEST(TorchFilePlaceholders, UnknownClassesInsideAStateDictDoNotHideTheTensors) {
  // numpy scalars and custom objects next to tensors (common in training checkpoints).
  TempDir dir;
  const auto f = load_pickle(dir,
                             Pickle()
                                 .global("collections", "OrderedDict")
                                 .op(')')
                                 .op('R')
                                 .mark()
                                 .str("w")
                                 .tensor("FloatStorage", "0", 4, 0, {2, 2}, {2, 1})
                                 .str("best")
                                 .global("numpy.core.multiarray", "scalar")
                                 .mark()
                                 .global("numpy", "dtype")
                                 .mark()
                                 .str("f8")
                                 .op(0x89)
                                 .op(0x88)
                                 .op('t')
                                 .op('R')
                                 .op('C')
                                 .le(8, 1)
                                 .raw(std::string(8, '\0'))
                                 .op('t')
                                 .op('R')
                                 .op('u')
                                 .stop(),
                             {{"0", float_bytes({1, 2, 3, 4})}});
  const auto tensors = torch_state_dict(f);
  ASSERT_EQ(tensors.size(), 1u);
  EXPECT_TRUE(test::bit_equal(tensors[0].second, at::tensor({1.f, 2.f, 3.f, 4.f}).reshape({2, 2})));
  const PyObject* best = f.pickle.objects.find(f.pickle.root, "best");
  ASSERT_NE(best, nullptr);
  EXPECT_EQ(best->kind, PyKind::Object);
  EXPECT_EQ(best->str, "numpy.core.multiarray.scalar");
}

TEST(TorchFileReconstructors, OrderedDictViaReduceWithPairsAndViaNewobjIsADict) {
  TempDir dir;
  const auto reduced = load_pickle(dir, Pickle()
                                            .global("collections", "OrderedDict")
                                            .mark()
                                            .op(']')
                                            .mark()
                                            .str("a")
                                            .integer(1)
                                            .op(0x86)  // TUPLE2
                                            .str("b")
                                            .integer(2)
                                            .op(0x86)
                                            .op('e')
                                            .op('t')
                                            .op('R')
                                            .stop());
  const auto& r = reduced.pickle;
  ASSERT_EQ(r.objects[r.root].kind, PyKind::Dict);
  ASSERT_EQ(r.objects[r.root].entries.size(), 2u);
  EXPECT_EQ(r.objects.find(r.root, "a")->integer, 1);
  EXPECT_EQ(r.objects.find(r.root, "b")->integer, 2);

  const auto newobj = load_pickle(dir, Pickle()
                                           .global("collections", "OrderedDict")
                                           .op(')')
                                           .op(0x81)
                                           .mark()
                                           .str("x")
                                           .integer(5)
                                           .op('u')
                                           .op('}')  // the OrderedDict's attribute state
                                           .op('b')
                                           .stop());
  const auto& n = newobj.pickle;
  ASSERT_EQ(n.objects[n.root].kind, PyKind::Dict);
  ASSERT_EQ(n.objects[n.root].entries.size(), 1u);
  EXPECT_EQ(n.objects.find(n.root, "x")->integer, 5);
}

TEST(TorchFileReconstructors, CodecsEncodeLatin1GivesBytes) {
  // Protocol 2 pickles b"\xff\x00ab" as _codecs.encode("\u00ff\x00ab", "latin1").
  TempDir dir;
  const auto f = load_pickle(dir, Pickle()
                                      .global("_codecs", "encode")
                                      .mark()
                                      .str("\xc3\xbf" + std::string(1, '\0') + "ab")
                                      .str("latin1")
                                      .op('t')
                                      .op('R')
                                      .stop());
  const PyObject& bytes = f.pickle.objects[f.pickle.root];
  ASSERT_EQ(bytes.kind, PyKind::Bytes);
  EXPECT_EQ(bytes.str, std::string("\xff\x00"
                                   "ab",
                                   4));
  // Text that latin-1 cannot encode is a format error, not garbage bytes.
  EXPECT_THROW(
      load_pickle(dir,
                  Pickle().global("_codecs", "encode").mark().str("✓").str("latin1").op('t').op('R').stop()),
      FormatError);
}

TEST(TorchFileReconstructors, RebuildParameterGivesItsTensor) {
  TempDir dir;
  const auto f = load_pickle(dir,
                             Pickle()
                                 .global("torch._utils", "_rebuild_parameter")
                                 .mark()
                                 .tensor("FloatStorage", "0", 4, 1, {3}, {1})
                                 .op(0x88)  // requires_grad
                                 .empty_ordered_dict()
                                 .op('t')
                                 .op('R')
                                 .stop(),
                             {{"0", float_bytes({1, 2, 3, 4})}});
  const PyObject& param = f.pickle.objects[f.pickle.root];
  ASSERT_EQ(param.kind, PyKind::Tensor);
  EXPECT_TRUE(test::bit_equal(param.tensor, at::tensor({2.f, 3.f, 4.f})));
  EXPECT_EQ(param.tensor.storage_offset(), 1);
}

TEST(TorchFileReconstructors, SharedStorageKeyAcrossTensorsGivesOneStorage) {
  // Two persistent ids with the same key (as torch.save writes for views) map to one storage.
  TempDir dir;
  const auto f = load_pickle(dir,
                             Pickle()
                                 .mark()
                                 .tensor("FloatStorage", "0", 4, 0, {2, 2}, {2, 1})
                                 .tensor("FloatStorage", "0", 4, 0, {2, 2}, {1, 2})
                                 .op('l')
                                 .stop(),
                             {{"0", float_bytes({1, 2, 3, 4})}});
  const auto& o = f.pickle.objects;
  const PyObject& list = o[f.pickle.root];
  ASSERT_EQ(list.items.size(), 2u);
  EXPECT_EQ(storage_data(o[list.items[0]].tensor), storage_data(o[list.items[1]].tensor));
  EXPECT_TRUE(test::bit_equal(o[list.items[1]].tensor, o[list.items[0]].tensor.t()));
}

// ---------------------------------------------------------------------------------------------
// 5. Fuzz

// Loads `path`; "" when it loaded or threw a voken::Error, else what went wrong. Successful
// loads are also exercised: every tensor is read (a bad bounds check would fault here) and the
// state dict extracted.
std::string load_and_touch(const std::string& path, Shared& shared) {
  try {
    const TorchFile file = load_torch_file(path);
    for (std::size_t i = 0; i < file.pickle.objects.size(); ++i) {
      const PyObject& o = file.pickle.objects[static_cast<PyRef>(i)];
      if ((o.kind == PyKind::Tensor || o.kind == PyKind::Storage) && o.tensor.numel() <= (1 << 16))
        (void)o.tensor.contiguous();
    }
    try {
      (void)torch_state_dict(file);
    } catch (const WeightsError&) {
    }
    ++shared.counters[0];
    return "";
  } catch (const Error&) {
    ++shared.counters[1];
    return "";
  } catch (const std::exception& e) {
    return std::string("non-voken exception ") + typeid(e).name() + ": " + e.what();
  } catch (...) {
    return "non-std exception";
  }
}

TEST(TorchFileFuzz, MutatedFilesLoadOrThrowVokenErrorsOnly) {
  TempDir dir;
  using PV = PickleValue;
  const std::string base_path = dir.file("base.pth");
  const auto shared_storage = at::arange(12, at::kFloat).reshape({3, 4});
  save_torch_file(
      base_path,
      PV::dict({{"state_dict", PV::dict({{"w", PV::of(shared_storage)},
                                         {"wt", PV::of(shared_storage.t())},
                                         {"row", PV::of(shared_storage.select(0, 1).expand({2, 4}))},
                                         {"h", PV::of(at::ones({3}, at::kHalf))},
                                         {"i", PV::of(at::arange(5, at::kLong))}})},
                {"epoch", PV::of(7)},
                {"big", PV::of(int64_t{1} << 40)},
                {"hparams", PV::ns({{"name", PV::of("ünï")}, {"lr", PV::of(0.5)}})},
                {"nested", PV::list({PV::tuple({PV::none(), PV::of(true)}), PV::of(-3)})}}));
  const std::string base = test::read_file(base_path);
  const auto archive = ZipArchive::open(MappedFile::open(base_path));
  const ZipRecord* pickle_record = archive.find("base/data.pkl");
  ASSERT_NE(pickle_record, nullptr);
  const std::size_t pickle_begin = pickle_record->data_offset;
  const std::size_t pickle_size = pickle_record->size;
  const std::string pickle = base.substr(pickle_begin, pickle_size);
  std::size_t directory_begin = 0;
  for (int i = 3; i >= 0; --i)
    directory_begin = (directory_begin << 8) | static_cast<uint8_t>(base[base.size() - 22 + 16 + i]);
  ASSERT_LT(directory_begin, base.size());
  std::vector<std::pair<std::string, std::string>> storages;
  for (const auto& record : archive.records())
    if (record.name.rfind("base/data/", 0) == 0)
      storages.emplace_back(record.name.substr(10), base.substr(record.data_offset, record.size));

  Shared final_state{};
  const auto verdict = run_isolated(
      [&](Shared& shared) -> std::string {
        std::mt19937_64 rng(0x766f6b656eull);  // fixed seed: failures reproduce
        auto below = [&](std::size_t n) { return n == 0 ? 0 : static_cast<std::size_t>(rng() % n); };
        auto random_byte = [&] { return static_cast<char>(rng() & 0xff); };
        // Opcodes and their likely operands make pickle mutations reach deeper than random bytes.
        static const char kInteresting[] =
            "()0125NIJKLMFGXUTBCVS]}lts"
            "aeudhgjqprcR\x81\x92ob\x93QP."
            "\x80\x85\x86\x87\x88\x89\x8a\x8b\x8c\x8d\x8e\x8f\x90\x91\x94\x95\x96"
            "\x00\x01\x7f\xff";
        const std::string interesting(kInteresting, sizeof kInteresting - 1);
        const std::string path = dir.file("mutant.pth");
        int index = 0;
        auto attempt = [&](const std::string& what, const std::string& bytes) -> std::string {
          note(shared, "mutation " + std::to_string(index++) + " (" + what + ")");
          test::write_file(path, bytes);
          const std::string failure = load_and_touch(path, shared);
          return failure.empty() ? "" : std::string(shared.note) + ": " + failure;
        };
        auto flip = [&](std::string bytes, std::size_t begin, std::size_t size, std::string& what) {
          const std::size_t n = 1 + below(3);
          for (std::size_t k = 0; k < n; ++k) {
            const std::size_t at = begin + below(size);
            bytes[at] = rng() % 2 ? random_byte() : interesting[below(interesting.size())];
            what += " @" + std::to_string(at);
          }
          return bytes;
        };
        for (int i = 0; i < 3000; ++i) {  // bytes inside data.pkl, zip left intact
          std::string what = "pickle bytes";
          if (auto f = attempt(what, flip(base, pickle_begin, pickle_size, what)); !f.empty()) return f;
        }
        for (int i = 0; i < 600; ++i) {  // the central directory and end record
          std::string what = "directory bytes";
          if (auto f = attempt(what, flip(base, directory_begin, base.size() - directory_begin, what));
              !f.empty())
            return f;
        }
        for (int i = 0; i < 400; ++i) {  // anywhere: local headers, storages, padding
          std::string what = "any bytes";
          if (auto f = attempt(what, flip(base, 0, base.size(), what)); !f.empty()) return f;
        }
        for (int i = 0; i < 400; ++i) {
          const std::size_t at = below(base.size());
          if (auto f = attempt("truncate at " + std::to_string(at), base.substr(0, at)); !f.empty()) return f;
        }
        for (int i = 0; i < 400; ++i) {
          const std::size_t at = below(base.size() + 1);
          std::string inserted(1 + below(16), '\0');
          for (char& c : inserted) c = random_byte();
          std::string bytes = base;
          bytes.insert(at, inserted);
          if (auto f =
                  attempt("insert " + std::to_string(inserted.size()) + " at " + std::to_string(at), bytes);
              !f.empty())
            return f;
        }
        for (int i = 0; i < 2000; ++i) {  // edit the pickle and re-zip it, so its length can change
          std::string edited = pickle;
          std::string what = "re-zipped pickle:";
          for (std::size_t k = 0, n = 1 + below(4); k < n; ++k) {
            const std::size_t at = below(edited.size() + 1);
            switch (rng() % 3) {
              case 0:
                edited.insert(at, 1, interesting[below(interesting.size())]);
                what += " insert@" + std::to_string(at);
                break;
              case 1:
                if (at < edited.size()) edited.erase(at, 1 + below(8));
                what += " erase@" + std::to_string(at);
                break;
              default:
                if (at < edited.size()) edited[at] = interesting[below(interesting.size())];
                what += " replace@" + std::to_string(at);
            }
          }
          std::vector<std::pair<std::string, std::string>> records{{"base/data.pkl", edited}};
          for (const auto& [key, bytes] : storages) records.emplace_back("base/data/" + key, bytes);
          records.emplace_back("base/version", "3\n");
          if (auto f = attempt(what, zip_bytes(records)); !f.empty()) return f;
        }
        return "";
      },
      120, &final_state);
  EXPECT_TRUE(verdict);
  // Both outcomes must actually occur, or the mutations are not reaching the interesting code.
  std::printf("fuzz: %lld mutants loaded, %lld refused with a voken::Error\n",
              static_cast<long long>(final_state.counters[0]),
              static_cast<long long>(final_state.counters[1]));
  EXPECT_GT(final_state.counters[0], 100);
  EXPECT_GT(final_state.counters[1], 1000);
}

}  // namespace
}  // namespace voken::io
