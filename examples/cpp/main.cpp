// fxeff_run: runs a traced focused model (fxeff.export.trace) from C++ with fxeff's ops.
//
//   fxeff_run <fxeff op library .so> <model.pt> <input.pt> <output.pt>
//
// The op library (fxeff.library_path()) holds only TORCH_LIBRARY registrations and kernels, no
// Python symbols: dlopen runs its static registrations, after which torch::jit::load resolves the
// model's fxeff::aoi_mask / mask_resize / focused_conv2d calls. The input is a tensor saved from
// Python with torch.save; the output is written with torch::pickle_save (read it with torch.load).
#include <dlfcn.h>

#include <fstream>
#include <iostream>
#include <iterator>
#include <string>
#include <vector>

#include <torch/script.h>  // torch::jit::load, torch::jit::pickle_load / pickle_save

namespace {

std::vector<char> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("fxeff_run: cannot open " + path);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

void write_file(const std::string& path, const std::vector<char>& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (!out) throw std::runtime_error("fxeff_run: cannot write " + path);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 5) {
    std::cerr << "usage: " << argv[0] << " <fxeff op library .so> <model.pt> <input.pt> <output.pt>\n";
    return 2;
  }
  const std::string library = argv[1], model_path = argv[2], input_path = argv[3], output_path = argv[4];

  if (dlopen(library.c_str(), RTLD_NOW | RTLD_GLOBAL) == nullptr) {
    std::cerr << "fxeff_run: dlopen(" << library << ") failed: " << dlerror() << "\n";
    return 3;
  }
  try {
    torch::jit::Module model = torch::jit::load(model_path);
    model.eval();
    const at::Tensor input = torch::jit::pickle_load(read_file(input_path)).toTensor();
    c10::AutoGradMode no_grad(false);
    const at::Tensor output = model.forward({input}).toTensor();
    write_file(output_path, torch::jit::pickle_save(output));
    std::cout << "fxeff_run: input " << input.sizes() << " -> output " << output.sizes() << "\n";
  } catch (const std::exception& error) {
    std::cerr << "fxeff_run: " << error.what() << "\n";
    return 1;
  }
  return 0;
}
