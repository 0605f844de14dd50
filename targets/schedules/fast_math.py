"""exp, sigmoid and erf as polynomials the kernels vectorise, and divisions by a constant as
multiplications (a TIR rewrite before scheduling).

LLVM lowers TVM's ``T.exp`` / ``T.sigmoid`` (``1 / (1 + exp(-x))``) / ``T.erf`` on float32 to calls
of libm's scalar ``expf`` / ``erff``: a vectorised epilogue becomes 16 calls per AVX-512 vector
(EfficientNet-B0's convolutions with SiLU ran at 3 GFLOP/s against 30-200 for the same
convolutions without it; its lib.so made 1,276 ``expf`` calls). This rewrite replaces them in
every kernel, before the schedule rules run, by branch-free float32 arithmetic that vectorises
like the rest of the epilogue, as ONNX Runtime's MLAS and XNNPACK evaluate them:

- ``exp(x)``: ``x`` clamped to [-104, 88.8] (float32's exp is 0 below, inf above);
  ``n = floor(x log2(e) + 1/2)``; ``r = x - n ln(2)`` (ln 2 split in two constants so that
  ``r`` is exact to float32); ``exp(r)`` by Cephes' degree-7 polynomial on ``|r| <= ln(2)/2``;
  times ``2**h * 2**(n - h)``, ``h = n >> 1``, each built in the exponent bits (two factors so
  that results near float32's limits underflow to denormals and overflow to inf as libm's
  do). Relative error about 3e-7 (1-2 float32 ulp) on normal results. A NaN input is not
  propagated (the clamp returns a bound).
- ``sigmoid(x)``: ``x`` clamped to [-17, 17] (``sigmoid(17) = 1 - 4e-8``) and
  ``1/2 + x P(x^2) / Q(x^2)`` (numerator of degree 7, odd; denominator of degree 8, even, positive
  coefficients: no pole), the result clamped to [0, 1]: the form of ONNX Runtime's MLAS logistic,
  with coefficients fitted here (``SIGMOID_NUMERATOR``). 15 vector operations and no integer ones
  where ``1 / (1 + exp(-x))`` took about 25: a SiLU over 56x56x144 floats 0.19 -> 0.11 ms with
  AVX-512 (the multiply-add of the depthwise convolution before it alone 0.10), EfficientNet-B0
  has 6.2 million SiLU outputs per inference. Absolute error 2.4e-7 against libm (the exp form:
  2.5e-7).
- ``erf(x)``: ``x`` clamped to [-4, 4] (``erf(4) = 1 - 1.5e-8``) and the rational
  approximation used by Eigen's float ``erf`` (odd degree-13 numerator / even degree-8
  denominator); absolute error about 1e-7.

- ``a / c`` for a float32 constant ``c`` whose reciprocal is a normal float32 number: ``a * r``,
  ``r = 1/c`` rounded to float32 (exact where ``c`` is a power of two). LLVM keeps the division
  (it may not use a reciprocal that is not exact without fast-math flags): one ``vdivps`` per output
  vector in every hard-swish epilogue (``x * relu6(x + 3) / 6``, MobileNetV3's activation; 177
  ``vdivps`` in MobileNetV3-small's x86 lib.so). Two roundings instead of one: within 1.5
  float32 ulp of ``a / c``; ONNX's own definition of HardSwish, ``x * HardSigmoid(x)`` with
  ``alpha = 1/6``, multiplies by the rounded reciprocal too.

float32 only; other dtypes keep TVM's lowering. Verification checks every build against ONNX
Runtime at the usual tolerance (rtol 1e-4 of an output's largest value), far above these
errors; ``--no-schedules`` builds keep libm's functions.
"""

from __future__ import annotations

LOG2E = 1.44269504088896341
LN2_HI = 0.693359375  # exact in float32 with 9 bits: n * LN2_HI is exact for |n| <= 128
LN2_LO = -2.12194440e-4
EXP_RANGE = (-104.0, 88.8)  # exp is 0 / inf in float32 beyond
# Cephes expf: exp(r) = 1 + r + r^2 * P(r)
EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)
# sigmoid(x) = 1/2 + x * P(x^2) / Q(x^2) on [-17, 17], highest degree first: fitted in float64
# (Lawson-weighted linearised least squares, 300 rounds on a 200,001-point grid of [0, 17]),
# max error 1.1e-7 there, 2.4e-7 evaluated in float32 (tests/targets/test_fast_math.py sweep)
SIGMOID_LIMIT = 17.0
SIGMOID_NUMERATOR = (4.217196013965023e-08, 4.5155587633535883e-05, 8.042226213485935e-03, 0.249999738500898)
SIGMOID_DENOMINATOR = (8.8372761902923e-10, 3.596905057616789e-06, 1.4726405956008962e-03, 0.11550130983513816, 1.0)
ERF_LIMIT = 4.0
# Eigen's float erf: erf(x) = x * P(x^2) / Q(x^2)
ERF_NUMERATOR = (
    -2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
    -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02,
)  # fmt: skip
ERF_DENOMINATOR = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03, -1.42647390514189e-02)

REWRITTEN = ("tirx.exp", "tirx.sigmoid", "tirx.erf")


def fast_math():
    """The module pass: every float32 exp/sigmoid/erf call and division by a constant in a
    PrimFunc rewritten as above."""
    import tvm
    import tvm_ffi
    from tvm import tirx

    def rewrite(call):
        name = getattr(call.op, "name", "")
        if name not in REWRITTEN or str(call.ty) != "float32":
            return call
        x = call.args[0]
        if name == "tirx.exp":
            return fast_exp(x)
        if name == "tirx.sigmoid":
            return fast_sigmoid(x)
        return fast_erf(x)

    @tvm.transform.module_pass(opt_level=0, name="EdgecFastMath")
    def _pass(mod, _ctx):
        updates = {}
        for gvar, func in mod.functions_items():
            if isinstance(func, tirx.PrimFunc) and _has_rewrites(func.body):
                callbacks = [(tvm.ir.Call, rewrite), (tirx.Div, reciprocal_product)]
                updates[gvar] = func.with_body(tvm_ffi.structural_map(func.body, callbacks, order="post"))
        if not updates:
            return mod
        mod = mod.clone()  # the caller's module stays as it was
        for gvar, func in updates.items():
            mod[gvar] = func
        return mod

    return _pass


def _has_rewrites(body) -> bool:
    """Whether ``body`` has something to rewrite: a float32 exp/sigmoid/erf call or a float32
    division by a constant with a normal reciprocal."""
    import tvm
    import tvm_ffi
    from tvm import tirx

    found = []

    def note(call):
        if getattr(call.op, "name", "") in REWRITTEN and str(call.ty) == "float32":
            found.append(call)
        return call

    def note_division(division):
        if _reciprocal(division) is not None:
            found.append(division)
        return division

    tvm_ffi.structural_map(body, [(tvm.ir.Call, note), (tirx.Div, note_division)], order="post")
    return bool(found)


def _reciprocal(division) -> float | None:
    """``1 / c`` rounded to float32 when ``division`` is a float32 ``a / c`` by a constant ``c``
    whose reciprocal is a normal float32 number (not 0, a denormal, inf or NaN), else None."""
    import numpy as np
    from tvm import tirx

    if str(division.ty) != "float32" or not isinstance(division.b, tirx.FloatImm):
        return None
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        reciprocal = np.float32(1.0) / np.float32(division.b.value)
    if not np.isfinite(reciprocal) or abs(reciprocal) < np.finfo(np.float32).tiny:
        return None
    return float(reciprocal)


def reciprocal_product(division):
    """``a / c`` as ``a * (1/c)`` for a float32 constant ``c`` (the module docstring); any other
    division as it is."""
    reciprocal = _reciprocal(division)
    return division if reciprocal is None else division.a * _f32(reciprocal)


def _f32(value: float):
    from tvm import tirx

    return tirx.const(value, "float32")


def _horner(x, coefficients):
    result = _f32(coefficients[0])
    for coefficient in coefficients[1:]:
        result = result * x + _f32(coefficient)
    return result


def fast_exp(x):
    """exp(x) for a float32 TIR expression (the module docstring)."""
    from tvm import tirx

    x = tirx.max(tirx.min(x, _f32(EXP_RANGE[1])), _f32(EXP_RANGE[0]))
    n = tirx.floor(x * _f32(LOG2E) + _f32(0.5))
    r = x - n * _f32(LN2_HI) - n * _f32(LN2_LO)
    p = _horner(r, EXP_POLY) * r * r + r + _f32(1.0)
    whole = tirx.Cast("int32", n)
    half = tirx.shift_right(whole, tirx.const(1, "int32"))
    return p * _power_of_two(half) * _power_of_two(whole - half)


def _power_of_two(k):
    """2**k as float32 for an int32 ``k`` in [-126, 127]."""
    from tvm import tirx

    return tirx.reinterpret("float32", tirx.shift_left(k + tirx.const(127, "int32"), tirx.const(23, "int32")))


def fast_sigmoid(x):
    """sigmoid(x) for a float32 TIR expression (the module docstring)."""
    from tvm import tirx

    x = tirx.max(tirx.min(x, _f32(SIGMOID_LIMIT)), _f32(-SIGMOID_LIMIT))
    x2 = x * x
    ratio = x * _horner(x2, SIGMOID_NUMERATOR) / _horner(x2, SIGMOID_DENOMINATOR)
    return tirx.max(tirx.min(ratio + _f32(0.5), _f32(1.0)), _f32(0.0))


def fast_erf(x):
    """erf(x) for a float32 TIR expression (the module docstring)."""
    from tvm import tirx

    x = tirx.max(tirx.min(x, _f32(ERF_LIMIT)), _f32(-ERF_LIMIT))
    x2 = x * x
    return x * _horner(x2, ERF_NUMERATOR) / _horner(x2, ERF_DENOMINATOR)
