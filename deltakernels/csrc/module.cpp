// The deltaserve CPU kernels as one Python extension module (built by deltakernels/cpu_extension.py).
#include "delta_cpu.h"

namespace deltaserve {
void bitdelta_apply_cpu(torch::Tensor y, torch::Tensor x, torch::Tensor signs, torch::Tensor scales,
                        torch::Tensor order, torch::Tensor segments);
void lora_shrink_cpu(torch::Tensor buf, torch::Tensor x, torch::Tensor a, torch::Tensor ranks, torch::Tensor order,
                     torch::Tensor segments);
void lora_expand_cpu(torch::Tensor y, torch::Tensor buf, torch::Tensor bt, torch::Tensor scaling, torch::Tensor ranks,
                     torch::Tensor order, torch::Tensor segments);
void lora_apply_cpu(torch::Tensor y, torch::Tensor x, torch::Tensor a, torch::Tensor bt, torch::Tensor scaling,
                    torch::Tensor ranks, torch::Tensor order, torch::Tensor segments, torch::Tensor buf);
}  // namespace deltaserve

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("bitdelta_apply", &deltaserve::bitdelta_apply_cpu, "1-bit delta apply over slot segments (CPU)");
  m.def("lora_shrink", &deltaserve::lora_shrink_cpu, "LoRA shrink over slot segments (CPU)");
  m.def("lora_expand", &deltaserve::lora_expand_cpu, "LoRA expand over slot segments (CPU)");
  m.def("lora_apply", &deltaserve::lora_apply_cpu, "LoRA shrink then expand over slot segments, one pass (CPU)");
  m.def("isa", [] { return std::string(deltaserve::isa_name()); }, "the code path the kernels take");
  m.def("has_avx512", &deltaserve::cpu_has_avx512, "whether this CPU has AVX-512 F + BW + VL");
  m.def("has_avx2", &deltaserve::cpu_has_avx2, "whether this CPU has AVX2 + FMA");
  m.def("set_isa", &deltaserve::set_isa, "force the code path: auto, avx512, avx2 or generic (tests)");
}
