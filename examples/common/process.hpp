// examples/common/process.hpp — what the demos measure about their own process (resident set,
// peak RSS per phase, heap peak, CPU time), the OpenMP thread count, and `--name VALUE`
// command-line options. Linux: /proc/self/{statm,clear_refs}, getrusage, malloc_trim.
#pragma once

#include <lowmem/core/memory.hpp>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <ctime>
#include <functional>
#include <malloc.h>
#include <stdexcept>
#include <string>
#include <sys/resource.h>
#include <unistd.h>
#include <utility>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace demo {

// ---- memory and time ---------------------------------------------------------------------------

inline double mib(std::int64_t bytes) { return double(bytes) / (1024.0 * 1024.0); }

/// Resets the kernel's RSS high-water mark (Linux ≥ 4.0: "5" > /proc/self/clear_refs) after
/// returning freed heap to the OS, so the next getrusage() peak belongs to the next phase. False
/// if refused (the peak is then the process maximum).
inline bool reset_peak_rss() {
  malloc_trim(0);
  std::FILE* f = std::fopen("/proc/self/clear_refs", "w");
  if (!f) return false;
  const bool ok = std::fputs("5", f) >= 0;
  return std::fclose(f) == 0 && ok;
}

/// Current resident set (KiB) from /proc/self/statm; 0 when unavailable.
inline long current_rss_kib() {
  std::FILE* f = std::fopen("/proc/self/statm", "r");
  if (!f) return 0;
  long size = 0, resident = 0;
  const int n = std::fscanf(f, "%ld %ld", &size, &resident);
  std::fclose(f);
  return n == 2 ? resident * (sysconf(_SC_PAGESIZE) / 1024) : 0;
}

/// The RSS high-water mark (KiB, getrusage ru_maxrss) since the process start or the last reset.
inline long peak_rss_kib() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return u.ru_maxrss;
}

/// Process CPU seconds (all threads): the machine is shared, so wall time alone misleads.
inline double process_cpu_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
}

/// The memory of one phase of a program (see measure_phase).
struct phase_memory {
  bool rss_reset = false;            // false: the kernel refused the reset, peak is the process max
  long start_rss_kib = 0;            // resident set at the phase's start
  long peak_rss_kib = 0;             // RSS high-water mark at the phase's end
  std::int64_t heap_peak_bytes = -1; // lowmem::memory::region peak (-1: hooks not installed)
};

/// Runs `phase()` with its own peak RSS (high-water mark reset before it) and heap peak (a
/// lowmem::memory::region around it; counted only when the program installs the memory hooks).
template <class F> phase_memory measure_phase(F&& phase) {
  phase_memory m;
  m.rss_reset = reset_peak_rss();
  m.start_rss_kib = current_rss_kib();
  {
    lowmem::memory::region region;
    phase();
    if (lowmem::memory::tracking_enabled()) m.heap_peak_bytes = region.peak_bytes();
  }
  m.peak_rss_kib = peak_rss_kib();
  return m;
}

/// OpenMP threads for what follows: max(1, n). Without OpenMP: nothing (serial).
inline void set_threads(int n) {
#if defined(_OPENMP)
  omp_set_num_threads(std::max(1, n));
#else
  (void)n;
#endif
}

// ---- command line ------------------------------------------------------------------------------

/// Command-line options `--name` (a switch: sets a bool) and `--name VALUE` (std::sto* into a
/// long, int, float, double or string), parsed into variables the caller owns; their values
/// before parse() are the defaults, and a repeated option keeps its last value.
///
///   demo::options opts("char_gpt", "usage: char_gpt [--quick] [--steps N]\n");
///   opts.add("--quick", quick).add("--steps", steps);
///   if (const int rc = opts.parse(argc, argv)) return rc;
class options {
public:
  options(std::string program, std::string usage)
      : program_(std::move(program)), usage_(std::move(usage)) {}

  options& add(const char* name, bool& on) {
    return add_(name, false, [&on](const std::string&) { on = true; });
  }
  options& add(const char* name, std::string& v) {
    return add_(name, true, [&v](const std::string& s) { v = s; });
  }
  options& add(const char* name, long& v) {
    return add_(name, true, [&v](const std::string& s) { v = std::stol(s); });
  }
  options& add(const char* name, int& v) {
    return add_(name, true, [&v](const std::string& s) { v = std::stoi(s); });
  }
  options& add(const char* name, float& v) {
    return add_(name, true, [&v](const std::string& s) { v = std::stof(s); });
  }
  options& add(const char* name, double& v) {
    return add_(name, true, [&v](const std::string& s) { v = std::stod(s); });
  }

  /// 0 when every argument parsed. Otherwise 2 (the exit code), after printing the usage (an
  /// unknown option, a missing value) or "<program>: bad value for <name>" to stderr.
  int parse(int argc, char** argv) const {
    for (int i = 1; i < argc; ++i) {
      const std::string a = argv[i];
      const auto o =
          std::find_if(opts_.begin(), opts_.end(), [&](const option& x) { return x.name == a; });
      if (o == opts_.end() || (o->takes_value && i + 1 >= argc)) {
        print_usage();
        return 2;
      }
      try {
        o->set(o->takes_value ? std::string(argv[++i]) : std::string());
      } catch (const std::logic_error&) { // std::invalid_argument, std::out_of_range
        std::fprintf(stderr, "%s: bad value for %s\n", program_.c_str(), a.c_str());
        return 2;
      }
    }
    return 0;
  }
  void print_usage() const { std::fputs(usage_.c_str(), stderr); }

private:
  struct option {
    std::string name;
    bool takes_value;
    std::function<void(const std::string&)> set;
  };
  options& add_(const char* name, bool takes_value, std::function<void(const std::string&)> set) {
    opts_.push_back({name, takes_value, std::move(set)});
    return *this;
  }
  std::string program_, usage_;
  std::vector<option> opts_;
};

} // namespace demo
