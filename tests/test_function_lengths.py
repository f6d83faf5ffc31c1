"""No function in ``csrc/`` or ``kernels/`` over 120 lines (issue 11); ``tests/function_lengths.py`` lists them."""

from __future__ import annotations

from function_lengths import ROOT, cpp_functions, functions

KERNEL_LIMIT = 120


def test_no_kernel_function_over_the_limit():
    long = [row for row in functions([ROOT / "csrc", ROOT / "kernels"]) if row[0] > KERNEL_LIMIT]
    assert not long, f"functions over {KERNEL_LIMIT} lines (split them along their concerns): {long}"


def test_the_cpp_reading_finds_functions_and_their_lengths(tmp_path):
    source = tmp_path / "x.cu"
    source.write_text(
        "// f() { in a comment\n"
        "namespace a {\n"
        "#if defined(X)\n"
        "template <int N>\n"
        "__global__ void __launch_bounds__(256) f(int x) {\n"
        '  const char* s = "}";\n'
        "  if (x) {\n"
        "    auto g = [&](int y) { return y; };\n"
        "  }\n"
        "}\n"
        "#endif\n"
        "struct S {\n"
        "  int h() const { return 1; }\n"
        "};\n"
        "constexpr int k[] = {1, 2};\n"
        "}  // namespace a\n"
    )
    assert sorted(cpp_functions(source)) == [("f", 4, 7), ("h", 13, 1)]
