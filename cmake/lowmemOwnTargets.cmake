# Flags for lowmem's own tests, benchmarks and examples. Nothing here reaches the INTERFACE
# target: consumers choose their own instruction set and warnings.
if(LOWMEM_OPENMP)
  find_package(OpenMP COMPONENTS CXX)
endif()

find_package(ZLIB REQUIRED) # the Fashion-MNIST loader (examples/common) reads gzip IDX files

function(lowmem_apply_own_flags target)
  target_link_libraries(${target} PRIVATE lowmem::lowmem ZLIB::ZLIB)
  # examples/common: user-side helpers shared by examples and real-data tests (data loaders,
  # generic layers); not part of the installed library.
  target_include_directories(${target} PRIVATE ${PROJECT_SOURCE_DIR}/examples)
  if(LOWMEM_NATIVE)
    target_compile_options(${target} PRIVATE -march=native)
  endif()
  target_compile_options(${target} PRIVATE -Wall -Wextra -Wpedantic -Wno-ignored-attributes)
  if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU")
    # GCC 12 false positive inside its own avx512fintrin.h (_mm512_undefined_* used as "__Y").
    target_compile_options(${target} PRIVATE -Wno-uninitialized -Wno-maybe-uninitialized)
  endif()
  if(LOWMEM_WERROR)
    target_compile_options(${target} PRIVATE -Werror)
  endif()
  if(LOWMEM_SANITIZE)
    string(REPLACE ";" "," _san "${LOWMEM_SANITIZE}")
    target_compile_options(${target} PRIVATE -fsanitize=${_san} -fno-omit-frame-pointer
                                             -fno-sanitize-recover=all)
    target_link_options(${target} PRIVATE -fsanitize=${_san})
    target_compile_definitions(${target} PRIVATE LOWMEM_SANITIZER_BUILD=1)
  endif()
  if(LOWMEM_OPENMP AND OpenMP_CXX_FOUND)
    target_link_libraries(${target} PRIVATE OpenMP::OpenMP_CXX)
  endif()
endfunction()
