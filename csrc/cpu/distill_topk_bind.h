// Binding of the top-k kernel (distill_topk.cpp) into the extension module defined in distill_cpu.cpp.
#pragma once

#include <torch/extension.h>

namespace rkd::cpu {

// Adds topk_forward to the module.
void bind_topk(pybind11::module_& mod);

}  // namespace rkd::cpu
