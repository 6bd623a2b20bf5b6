// Every checkpoint in the golden folder (real upstream layouts: LAVIS .pth, Lightning .ckpt, HF
// and diffusers safetensors) loads in C++ bit-exactly equal to what Python reads from it
// (torch.load for torch files, a numpy parse for safetensors), tensor by tensor, nested
// containers included.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <functional>

#include "common/test_support.h"
#include "io/safetensors.h"
#include "io/state_dict.h"
#include "io/torch_file.h"

namespace voken::io {
namespace {

namespace fs = std::filesystem;

std::vector<std::string> golden_checkpoints() {
  std::vector<std::string> files;
  const std::string root = test::golden_root();
  if (root.empty()) return files;
  for (const auto& entry : fs::recursive_directory_iterator(root)) {
    const std::string ext = entry.path().extension().string();
    if (entry.is_regular_file() &&
        (ext == ".pth" || ext == ".ckpt" || ext == ".bin" || ext == ".safetensors"))
      files.push_back(entry.path().string());
  }
  std::sort(files.begin(), files.end());
  return files;
}

// Tensors of a torch file named by their path in the object tree, as the Python dump names them.
std::map<std::string, at::Tensor> flatten(const TorchFile& file) {
  std::map<std::string, at::Tensor> out;
  const PyObjects& objects = file.pickle.objects;
  std::function<void(PyRef, const std::string&, int)> walk = [&](PyRef ref, const std::string& path,
                                                                 int depth) {
    ASSERT_LT(depth, 100);
    const PyObject& o = objects[ref];
    const std::string prefix = path.empty() ? "" : path + "/";
    switch (o.kind) {
      case PyKind::Tensor:
        out[path] = o.tensor;
        break;
      case PyKind::Dict:
        for (const auto& [k, v] : o.entries) {
          const PyObject& key = objects[k];
          walk(v, prefix + (key.kind == PyKind::String ? key.str : std::to_string(key.integer)), depth + 1);
        }
        break;
      case PyKind::List:
      case PyKind::Tuple:
        for (std::size_t i = 0; i < o.items.size(); ++i)
          walk(o.items[i], prefix + std::to_string(i), depth + 1);
        break;
      case PyKind::Object:
        walk(o.items[1], path, depth + 1);
        break;  // attributes, like vars(obj)
      default:
        break;
    }
  };
  walk(file.pickle.root, "", 0);
  return out;
}

TEST(GoldenCheckpoints, LoadBitExactlyLikePython) {
  const auto files = golden_checkpoints();
  if (files.empty()) GTEST_SKIP() << "no golden folder (set VOKEN_GOLDEN_DIR; default ../shared/golden)";
  test::TempDir dir;
  for (const auto& path : files) {
    SCOPED_TRACE(path);
    const std::string dump = dir.file("reference.safetensors");
    const int status =
        test::run_python(std::string(VOKEN_SOURCE_DIR) + "/tests/fixtures/torch_to_safetensors.py '" + path +
                         "' '" + dump + "'");
    if (WEXITSTATUS(status) == 3) GTEST_SKIP() << "Python torch is not installed";
    ASSERT_EQ(status, 0) << "reference dump failed";
    const auto reference = SafetensorsFile::open(dump);
    std::map<std::string, at::Tensor> got;
    if (fs::path(path).extension() == ".safetensors") {
      const auto state = StateDict::load(path);
      for (const auto& name : state.keys()) got[name] = state.at(name);
    } else {
      got = flatten(load_torch_file(path));
      EXPECT_FALSE(StateDict::load(path).empty());
    }
    ASSERT_EQ(got.size(), reference.entries().size());
    for (const auto& entry : reference.entries()) {
      ASSERT_TRUE(got.count(entry.name)) << entry.name;
      EXPECT_TRUE(test::bit_equal(got.at(entry.name), reference.tensor(entry))) << entry.name;
    }
    std::cout << "loaded " << path << ": " << got.size() << " tensors bit-exact\n";
  }
}

}  // namespace
}  // namespace voken::io
