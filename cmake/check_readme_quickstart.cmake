# ctest script: the README's quickstart block must be examples/quickstart.cpp verbatim.
file(READ ${README} readme)
file(READ ${QUICKSTART} quickstart)
string(FIND "${readme}" "```cpp\n${quickstart}```" at)
if(at EQUAL -1)
  message(FATAL_ERROR "README.md's quickstart block differs from examples/quickstart.cpp: paste the file into the README")
endif()
