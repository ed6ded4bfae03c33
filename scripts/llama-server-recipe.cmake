# The per-part settings of scripts/build-llama-server.sh's recipe (RECIPE r2), which passes
# this file as CMAKE_PROJECT_INCLUDE: it runs after each project() of llama.cpp and, once
# every target is defined (a deferred call), sets how each part of llama-server is compiled.
#
# Measured on 2 cores (README: Building llama-server): 90% of the compile time went to the
# C++ around the maths (argument parsing, chat parsers, Jinja, JSON, HTTP, multimodal),
# 10% to ggml. So:
#   - the per-token path keeps upstream's -O3: ggml (the maths), llama (decode, KV cache,
#     sampling) and common/sampling.cpp (it walks the whole vocabulary for every token:
#     with it and llama at -O1, Gemma 3 270M, 262k tokens of vocabulary, generated ~20%
#     fewer tokens/s);
#   - the per-request plumbing is compiled at -O1 and as unity builds (one compiler run per
#     16 files, so the heavy headers such as nlohmann/json are parsed once, not per file):
#     callgrind counts the same instructions per request (+0.2% on the tiny model, +0.004%
#     on Gemma 3 270M), and it compiles in half the time.
# A target missing here (a later llama.cpp renamed it) is reported in the configure log and
# simply keeps upstream's flags; tests/test_first_run.py checks what is compiled how.

if(CMAKE_VERSION VERSION_LESS 3.19)  # cmake_language(DEFER) and per-folder source properties
  message(WARNING "llama-server recipe: CMake ${CMAKE_VERSION} < 3.19; upstream's flags (slower to build)")
  return()
endif()

set(LLS_COLD_TARGETS
  llama-common llama-common-base mtmd server-context llama-server-impl cpp-httplib
  vendor-hash llama-ui)
set(LLS_COLD_FLAGS -O1)
set(LLS_UNITY_TARGETS llama-common mtmd server-context llama-server-impl)
set(LLS_UNITY_BATCH 16)
set(LLS_HOT_SOURCES common/sampling.cpp)
# mtmd-helper is built apart from mtmd's internal headers (it #errors in a unity batch
# that has them)
set(LLS_NOT_UNITY tools/mtmd/mtmd-helper.cpp tools/mtmd/mtmd-helper-gen.cpp)

function(lls_recipe)
  foreach(t IN LISTS LLS_COLD_TARGETS)
    if(TARGET ${t})
      # after CMAKE_CXX_FLAGS_RELEASE's -O3 on the command line: this one wins
      set_property(TARGET ${t} APPEND PROPERTY COMPILE_OPTIONS ${LLS_COLD_FLAGS})
    else()
      message(WARNING "llama-server recipe: no target ${t}; it keeps upstream's flags")
    endif()
  endforeach()
  foreach(t IN LISTS LLS_UNITY_TARGETS)
    if(TARGET ${t})
      set_target_properties(${t} PROPERTIES UNITY_BUILD ON UNITY_BUILD_BATCH_SIZE ${LLS_UNITY_BATCH})
    endif()
  endforeach()
  # source properties live in the folder that defines the target: absolute paths, that folder
  foreach(f IN LISTS LLS_HOT_SOURCES LLS_NOT_UNITY)
    set(path "${CMAKE_SOURCE_DIR}/${f}")
    get_filename_component(dir "${path}" DIRECTORY)
    set_property(SOURCE "${path}" DIRECTORY "${dir}" PROPERTY SKIP_UNITY_BUILD_INCLUSION ON)
  endforeach()
  foreach(f IN LISTS LLS_HOT_SOURCES)
    set(path "${CMAKE_SOURCE_DIR}/${f}")
    get_filename_component(dir "${path}" DIRECTORY)
    set_property(SOURCE "${path}" DIRECTORY "${dir}" APPEND PROPERTY COMPILE_OPTIONS -O3)
  endforeach()
  message(STATUS "llama-server recipe: ${LLS_COLD_FLAGS} and unity builds for the plumbing")
endfunction()

get_property(lls_deferred GLOBAL PROPERTY LLS_RECIPE_DEFERRED)
if(NOT lls_deferred)  # ggml's project() includes this file again
  set_property(GLOBAL PROPERTY LLS_RECIPE_DEFERRED TRUE)
  cmake_language(DEFER DIRECTORY "${CMAKE_SOURCE_DIR}" CALL lls_recipe)
endif()
