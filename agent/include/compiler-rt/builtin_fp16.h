/*
 * edgec-agent: IEEE-754 binary floating point narrowing and widening, as the
 * two templates builtin_fp16.cc instantiates for float16 (__gnu_f2h_ieee,
 * __gnu_h2f_ieee, __truncdfhf2):
 *
 *   __truncXfYf2__<SrcT, SrcRep, SrcSigBits, DstT, DstRep, DstSigBits>(a)
 *   __extendXfYf2__<...same...>(a)
 *
 * Written for edgec. A format is (sign, exponent, significand) packed in the
 * unsigned integer Rep, with SigBits stored significand bits and the rest of
 * Rep's bits (after the sign) the biased exponent. Narrowing rounds to
 * nearest, ties to even, overflows to infinity, underflows through the
 * subnormals to zero, keeps NaNs quiet NaNs (top payload bits kept) and the
 * sign of zeros. Widening is exact (the destination is the wider format).
 */
#ifndef EDGEC_COMPILER_RT_BUILTIN_FP16_H_
#define EDGEC_COMPILER_RT_BUILTIN_FP16_H_

#include <cstdint>
#include <cstring>

namespace edgec_fp {

template <typename Rep, int SigBits>
struct Format {
  static constexpr int kBits = static_cast<int>(sizeof(Rep) * 8);
  static constexpr int kExpBits = kBits - SigBits - 1;
  static constexpr int kExpMax = (1 << kExpBits) - 1;  // all ones: infinity or NaN
  static constexpr int kBias = (1 << (kExpBits - 1)) - 1;
  static constexpr Rep kSigMask = static_cast<Rep>((Rep(1) << SigBits) - 1);
  static constexpr Rep kSignBit = static_cast<Rep>(Rep(1) << (kBits - 1));
  static constexpr Rep kQuietBit = static_cast<Rep>(Rep(1) << (SigBits - 1));

  static Rep Pack(Rep sign, Rep exponent, Rep significand) {
    return static_cast<Rep>((sign ? kSignBit : Rep(0)) | static_cast<Rep>(exponent << SigBits) |
                            significand);
  }
};

template <typename To, typename From>
inline To BitCast(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "BitCast needs equal sizes");
  To to;
  std::memcpy(&to, &from, sizeof(To));
  return to;
}

}  // namespace edgec_fp

template <typename SrcT, typename SrcRep, int SrcSigBits, typename DstT, typename DstRep,
          int DstSigBits>
inline DstT __truncXfYf2__(SrcT a) {
  using Src = edgec_fp::Format<SrcRep, SrcSigBits>;
  using Dst = edgec_fp::Format<DstRep, DstSigBits>;
  static_assert(SrcSigBits > DstSigBits, "narrowing needs fewer significand bits in the result");
  const SrcRep bits = edgec_fp::BitCast<SrcRep>(a);
  const DstRep sign = (bits & Src::kSignBit) ? 1 : 0;
  const int src_exp = static_cast<int>((bits & ~Src::kSignBit) >> SrcSigBits);
  const SrcRep src_sig = bits & Src::kSigMask;
  constexpr int kDrop = SrcSigBits - DstSigBits;  // significand bits that do not fit

  if (src_exp == Src::kExpMax) {
    if (src_sig == 0) return edgec_fp::BitCast<DstT>(Dst::Pack(sign, Dst::kExpMax, 0));
    DstRep payload = static_cast<DstRep>((src_sig >> kDrop) & Dst::kSigMask);
    return edgec_fp::BitCast<DstT>(Dst::Pack(sign, Dst::kExpMax, payload | Dst::kQuietBit));
  }
  if (src_exp == 0 && src_sig == 0) return edgec_fp::BitCast<DstT>(Dst::Pack(sign, 0, 0));

  // value = significand * 2^(exponent - SrcSigBits), the significand with its leading one
  SrcRep significand = src_exp == 0 ? src_sig : (src_sig | (SrcRep(1) << SrcSigBits));
  int exponent = (src_exp == 0 ? 1 : src_exp) - Src::kBias;
  int dst_exp = exponent + Dst::kBias;
  if (dst_exp >= Dst::kExpMax) return edgec_fp::BitCast<DstT>(Dst::Pack(sign, Dst::kExpMax, 0));

  // Shift right by `shift` bits, rounding to nearest with ties to even. A subnormal
  // result (dst_exp < 1) is the significand shifted further, with a zero exponent field.
  int shift = dst_exp >= 1 ? kDrop : kDrop + (1 - dst_exp);
  if (shift >= SrcSigBits + 2) return edgec_fp::BitCast<DstT>(Dst::Pack(sign, 0, 0));
  SrcRep kept = significand >> shift;
  SrcRep rest = significand & ((SrcRep(1) << shift) - 1);
  SrcRep half = SrcRep(1) << (shift - 1);
  if (rest > half || (rest == half && (kept & 1))) ++kept;
  // For normals, `kept` holds the leading one: adding the exponent field on top of it
  // lets a rounding carry move into the exponent (and up to infinity) by itself.
  DstRep result = dst_exp >= 1 ? static_cast<DstRep>((DstRep(dst_exp - 1) << DstSigBits) + kept)
                               : static_cast<DstRep>(kept);
  return edgec_fp::BitCast<DstT>(static_cast<DstRep>(result | (sign ? Dst::kSignBit : DstRep(0))));
}

template <typename SrcT, typename SrcRep, int SrcSigBits, typename DstT, typename DstRep,
          int DstSigBits>
inline DstT __extendXfYf2__(SrcT a) {
  using Src = edgec_fp::Format<SrcRep, SrcSigBits>;
  using Dst = edgec_fp::Format<DstRep, DstSigBits>;
  static_assert(DstSigBits > SrcSigBits && Dst::kExpBits >= Src::kExpBits,
                "widening needs a wider result format");
  const SrcRep bits = edgec_fp::BitCast<SrcRep>(a);
  const DstRep sign = (bits & Src::kSignBit) ? 1 : 0;
  const int src_exp = static_cast<int>((bits & ~Src::kSignBit) >> SrcSigBits);
  DstRep sig = static_cast<DstRep>(bits & Src::kSigMask);
  constexpr int kGrow = DstSigBits - SrcSigBits;

  if (src_exp == Src::kExpMax) {
    DstRep payload = static_cast<DstRep>(sig << kGrow);
    if (sig != 0) payload |= Dst::kQuietBit;
    return edgec_fp::BitCast<DstT>(Dst::Pack(sign, Dst::kExpMax, payload));
  }
  if (src_exp == 0 && sig == 0) return edgec_fp::BitCast<DstT>(Dst::Pack(sign, 0, 0));
  int exponent = src_exp - Src::kBias;
  if (src_exp == 0) {
    // subnormal source: normalise so the leading one sits just above the stored bits
    exponent = 1 - Src::kBias;
    while ((sig & (DstRep(1) << SrcSigBits)) == 0) {
      sig = static_cast<DstRep>(sig << 1);
      --exponent;
    }
    sig &= static_cast<DstRep>((DstRep(1) << SrcSigBits) - 1);
  }
  DstRep dst_exp = static_cast<DstRep>(exponent + Dst::kBias);
  return edgec_fp::BitCast<DstT>(Dst::Pack(sign, dst_exp, static_cast<DstRep>(sig << kGrow)));
}

#endif  // EDGEC_COMPILER_RT_BUILTIN_FP16_H_
