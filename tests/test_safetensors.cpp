// safetensors I/O: round trips (lowmem <-> lowmem, Python -> lowmem, lowmem -> Python), zero-copy
// mapping, and every hostile-input rule of the parser.
#include <catch2/catch.hpp>
#include <lowmem/core/bf16.hpp>
#include <lowmem/io/safetensors.hpp>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

using namespace lowmem;
using io::dtype;

namespace {
std::string temp_path(const std::string& name) {
  return std::string("/tmp/lowmem_test_") + std::to_string(::getpid()) + "_" + name;
}
// A file from a header text and a data buffer.
std::vector<unsigned char> raw(const std::string& header, std::size_t data_bytes,
                               std::uint64_t declared = ~0ull) {
  std::vector<unsigned char> out(8 + header.size() + data_bytes, 0);
  const std::uint64_t n = declared == ~0ull ? header.size() : declared;
  for (int i = 0; i < 8; ++i) out[std::size_t(i)] = static_cast<unsigned char>(n >> (8 * i));
  std::memcpy(out.data() + 8, header.data(), header.size());
  return out;
}
std::string parse_error(const std::vector<unsigned char>& bytes) {
  try {
    io::safetensors_file::from_bytes(bytes.data(), bytes.size(), "t");
  } catch (const io::format_error& e) {
    return e.what();
  }
  return "no error";
}
} // namespace

TEST_CASE("safetensors round trip in memory and through a mapped file", "[io][safetensors]") {
  std::vector<float> w = {1.f, -2.f, 3.5f, 0.25f, 8.f, -0.5f};
  std::vector<std::int8_t> q = {-3, 4, 127};
  std::vector<bf16> h = {to_bf16(1.5f), to_bf16(-3.0f)};
  std::vector<io::tensor_to_write> ts = {{"layer.weight", dtype::f32, {2, 3}, w.data()},
                                         {"q", dtype::i8, {3}, q.data()},
                                         {"h", dtype::bf16, {2}, h.data()},
                                         {"empty", dtype::f32, {0, 4}, nullptr}};
  const auto bytes = io::to_safetensors_bytes(ts, {{"format", "pt"}});
  CHECK((bytes[0] | bytes[1] << 8) % 8 == 0); // data start padded to 8 bytes
  const auto f = io::safetensors_file::from_bytes(bytes.data(), bytes.size());
  REQUIRE(f.tensors().size() == 4);
  CHECK(f.metadata().at("format") == "pt");
  const auto& t = f.at("layer.weight");
  CHECK(t.shape == std::vector<std::int64_t>{2, 3});
  std::vector<float> back(6);
  f.copy_to("layer.weight", dtype::f32, back.data(), back.size());
  CHECK(back == w);
  CHECK(f.at("empty").bytes == 0);
  CHECK_THROWS_AS(f.copy_to("q", dtype::f32, back.data(), 3), io::format_error); // wrong dtype
  CHECK_THROWS_AS(f.at("missing"), io::format_error);

  const std::string path = temp_path("rt.safetensors");
  io::save_safetensors(path, ts, {{"format", "pt"}});
  const auto m = io::safetensors_file::open(path);
  std::vector<std::int8_t> qb(3);
  m.copy_to("q", dtype::i8, qb.data(), qb.size());
  CHECK(qb == q);
  std::vector<bf16> hb(2);
  m.copy_to("h", dtype::bf16, hb.data(), hb.size());
  CHECK(to_float(hb[1]) == -3.0f);
  std::remove(path.c_str());

  CHECK_THROWS_AS(io::to_safetensors_bytes(
                      {{"a", dtype::f32, {1}, w.data()}, {"a", dtype::f32, {1}, w.data()}}),
                  lowmem::invalid_argument);
  CHECK_THROWS_AS(io::to_safetensors_bytes({{"a", dtype::f32, {-1}, w.data()}}),
                  lowmem::invalid_argument);
  CHECK_THROWS_AS(io::to_safetensors_bytes({{"a", dtype::f32, {2}, nullptr}}),
                  lowmem::invalid_argument);
  CHECK_THROWS_AS(io::safetensors_file::open(temp_path("does_not_exist")), io::format_error);
}

TEST_CASE("safetensors rejects hostile input with a clear error", "[io][safetensors]") {
  using Catch::Contains;
  CHECK_THAT(parse_error({1, 2, 3}), Contains("shorter than the 8-byte header length"));
  CHECK_THAT(parse_error(raw("{}", 0, 1000)), Contains("runs past the end of the file"));
  CHECK_THAT(parse_error(raw("{}", 0, 1ull << 40)), Contains("exceeds the 100 MiB limit"));
  CHECK_THAT(parse_error(raw("{\"a\":", 0)), Contains("not valid JSON"));
  CHECK_THAT(parse_error(raw("[1,2]", 0)), Contains("not a JSON object"));
  CHECK_THAT(parse_error(raw("{\"a\\u0000\xff\":{}}", 0)), Contains("not valid JSON")); // bad UTF-8
  CHECK_THAT(parse_error(raw("{\"\xc3\x28\":{}}", 0)), Contains("not valid JSON"));     // bad UTF-8
  CHECK_THAT(parse_error(raw(R"({"a":{"dtype":"F33","shape":[1],"data_offsets":[0,4]}})", 4)),
             Contains("unknown dtype 'F33'"));
  CHECK_THAT(parse_error(raw(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}})", 4)),
             Contains("holds 4 bytes but shape x dtype needs 8"));
  CHECK_THAT(parse_error(raw(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,8]}})", 4)),
             Contains("outside the data buffer"));
  CHECK_THAT(parse_error(raw(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}})", 4)),
             Contains("outside the data buffer"));
  CHECK_THAT(parse_error(raw(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                             R"("b":{"dtype":"F32","shape":[1],"data_offsets":[2,6]}})",
                             8)),
             Contains("overlap"));
  CHECK_THAT(parse_error(raw(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", 8)),
             Contains("hole"));
  CHECK_THAT(parse_error(raw(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", 6)),
             Contains("trailing bytes"));
  CHECK_THAT(parse_error(raw(R"({"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,0]}})", 0)),
             Contains("not a non-negative integer"));
  CHECK_THAT(
      parse_error(
          raw(R"({"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,0]}})", 0)),
      Contains("overflows"));
  CHECK_THAT(parse_error(raw(R"({"a":{"dtype":"F32","shape":[1]}})", 4)), Contains("data_offsets"));
  CHECK_THAT(parse_error(raw(R"({"__metadata__":{"k":1}})", 0)), Contains("is not a string"));
  CHECK(parse_error(raw(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", 4)) ==
        "no error");
}

TEST_CASE("safetensors interoperates with an independent Python writer and reader",
          "[io][safetensors]") {
  if (std::system("test -x /usr/bin/python3") != 0) {
    WARN("no /usr/bin/python3: skipping the Python round trip");
    return;
  }
  const std::string script = std::string(LOWMEM_TEST_DATA_DIR) + "/safetensors_peer.py";
  const std::string from_py = temp_path("from_py.safetensors");
  REQUIRE(std::system(("/usr/bin/python3 " + script + " write " + from_py).c_str()) == 0);
  const auto f = io::safetensors_file::open(from_py);
  std::vector<float> w(6);
  f.copy_to("w.f32", dtype::f32, w.data(), w.size());
  CHECK(w == std::vector<float>{0.5f, -1.25f, 3.0f, 1e-3f, -7.5f, 2.0f});
  std::vector<bf16> h(3);
  f.copy_to("h.bf16", dtype::bf16, h.data(), h.size());
  CHECK(to_float(h[1]) == -2.5f);
  CHECK(f.metadata().at("writer") == "python");

  // write the same tensors back from lowmem; Python checks every value
  std::vector<io::tensor_to_write> out;
  std::vector<std::vector<unsigned char>> keep;
  for (const auto& t : f.tensors()) {
    keep.emplace_back(t.data, t.data + t.bytes);
    out.push_back({t.name, t.dtype, t.shape, keep.back().data()});
  }
  const std::string to_py = temp_path("to_py.safetensors");
  io::save_safetensors(to_py, out, {{"format", "pt"}, {"writer", "lowmem"}});
  CHECK(std::system(("/usr/bin/python3 " + script + " check " + to_py).c_str()) == 0);
  std::remove(from_py.c_str());
  std::remove(to_py.c_str());
}
