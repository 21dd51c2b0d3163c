# Torch discovery without torch's Caffe2 CMake config (fragile with pip CUDA wheels, see
# BUILD_NOTES.md): ask the Python interpreter that builds us for torch's paths and facts.
execute_process(
  COMMAND "${Python_EXECUTABLE}" -c
"import torch, torch.utils.cpp_extension as c, os
print(';'.join(c.include_paths()))
print(os.path.join(os.path.dirname(torch.__file__), 'lib'))
print(int(torch._C._GLIBCXX_USE_CXX11_ABI))
print(torch.__version__)
print(torch.version.cuda or '')"
  OUTPUT_VARIABLE _torch_out
  ERROR_VARIABLE _torch_err
  RESULT_VARIABLE _torch_rc
  OUTPUT_STRIP_TRAILING_WHITESPACE)
if(NOT _torch_rc EQUAL 0)
  message(FATAL_ERROR "moeops: cannot import torch with ${Python_EXECUTABLE}:\n${_torch_err}\n"
                      "Install torch>=2.10 first (pip install torch), or build with build isolation.")
endif()
string(REPLACE ";" "," _torch_out "${_torch_out}")   # protect the include list
string(REPLACE "\n" ";" _parts "${_torch_out}")
list(GET _parts 0 _incs)
list(GET _parts 1 TORCH_LIBRARY_DIR)
list(GET _parts 2 TORCH_CXX11_ABI)
list(GET _parts 3 TORCH_VERSION_STRING)
list(LENGTH _parts _n)
set(TORCH_CUDA_VERSION "")
if(_n GREATER 4)
  list(GET _parts 4 TORCH_CUDA_VERSION)
endif()
string(REPLACE "," ";" TORCH_INCLUDE_DIRS "${_incs}")
message(STATUS "moeops: torch ${TORCH_VERSION_STRING} (CUDA: '${TORCH_CUDA_VERSION}'), libs in ${TORCH_LIBRARY_DIR}")

foreach(_lib c10 torch_cpu torch)
  find_library(TORCH_LIB_${_lib} ${_lib} PATHS "${TORCH_LIBRARY_DIR}" NO_DEFAULT_PATH REQUIRED)
endforeach()
set(TORCH_CPU_LIBRARIES ${TORCH_LIB_c10} ${TORCH_LIB_torch_cpu} ${TORCH_LIB_torch})
