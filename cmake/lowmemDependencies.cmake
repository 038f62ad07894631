# Finds lowmem's dependencies: Eigen 3.4 and xsimd 8.1. Used by the build tree and shipped in the
# installed package config, so consumers get the same fix.
#
# Debian's libxsimd-dev 8.1.0-7 exports target `xsimd` with INTERFACE_LINK_LIBRARIES "xtl", a
# target that does not exist: linking then fails with "cannot find -lxtl". xsimd is header-only
# and needs nothing from xtl, so the phantom entry is removed.
include(CMakeFindDependencyMacro)
find_dependency(Eigen3 3.4 NO_MODULE)
find_dependency(xsimd 8.1)
if(TARGET xsimd AND NOT TARGET xtl)
  get_target_property(_lowmem_xsimd_links xsimd INTERFACE_LINK_LIBRARIES)
  if(_lowmem_xsimd_links)
    list(REMOVE_ITEM _lowmem_xsimd_links xtl)
    set_target_properties(xsimd PROPERTIES INTERFACE_LINK_LIBRARIES "${_lowmem_xsimd_links}")
  endif()
  unset(_lowmem_xsimd_links)
endif()
