// The per-instruction-set scaffold of the row kernels, second half: see distill_isa_begin.h.
#if RKD_ISA_ENABLED
namespace rkd::cpu::RKD_ISA {
#include "distill_rows.h"
}  // namespace rkd::cpu::RKD_ISA

#if defined(RKD_ISA_TARGET)
RKD_TARGET_POP()
#endif
#endif  // RKD_ISA_ENABLED

#define RKD_ISA_CAT_(a, b) a##b
#define RKD_ISA_CAT(a, b) RKD_ISA_CAT_(a, b)
#define RKD_ISA_STR_(x) #x
#define RKD_ISA_STR(x) RKD_ISA_STR_(x)

namespace rkd::cpu {

const KernelTable* RKD_ISA_CAT(RKD_ISA, _kernels)() {
#if RKD_ISA_ENABLED
  using VF = RKD_ISA::VF;
#if RKD_ISA_HAS_F64
  using VD = RKD_ISA::VD;
#define RKD_ISA_F64_ROWS &RKD_ISA::run_rows<VD, double>
#define RKD_ISA_F64_SCALE &RKD_ISA::scale_row<VD, double>
#else
#define RKD_ISA_F64_ROWS nullptr
#define RKD_ISA_F64_SCALE nullptr
#endif
  static const KernelTable table = {
      RKD_ISA_STR(RKD_ISA),
      {&RKD_ISA::run_rows<VF, float>, &RKD_ISA::run_rows<VF, bf16_t>, &RKD_ISA::run_rows<VF, fp16_t>,
       RKD_ISA_F64_ROWS},
      {&RKD_ISA::scale_row<VF, float>, &RKD_ISA::scale_row<VF, bf16_t>, &RKD_ISA::scale_row<VF, fp16_t>,
       RKD_ISA_F64_SCALE},
  };
  return &table;
#else
  return nullptr;
#endif
}

}  // namespace rkd::cpu
