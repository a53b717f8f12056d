// pybind11 module cps_fast._C. It never links libtorch: tensors arrive as integer addresses,
// sizes and element strides (see cps_fast/ext.py), the CUDA stream as its integer handle.
#include <pybind11/pybind11.h>

#include <string>

#include "ops.h"

#ifndef CPS_FAST_BUILD_STAMP
#define CPS_FAST_BUILD_STAMP "unknown"
#endif
#ifndef CPS_FAST_CUDA_ARCHS
#define CPS_FAST_CUDA_ARCHS ""
#endif

// Bumped whenever the Python <-> C++ calling convention changes; ext.py checks it.
constexpr int kAbiVersion = 2;

namespace py = pybind11;
using cps::ptr_t;
using cps::View;

namespace {

View make_view(int64_t N, int64_t C, int64_t HW, int64_t sN, int64_t sC, int64_t sP) {
  return View{N, C, HW, sN, sC, sP};
}

int omp_available() {
#ifdef _OPENMP
  return 1;
#else
  return 0;
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "cps_fast._C: host C++ and CUDA implementations of the cps_fast ops (no libtorch)";
  m.attr("ABI_VERSION") = kAbiVersion;
  m.attr("BUILD_STAMP") = std::string(CPS_FAST_BUILD_STAMP);
#ifdef CPS_FAST_WITH_CUDA
  m.attr("HAS_CUDA") = true;
  m.attr("CUDA_ARCHS") = std::string(CPS_FAST_CUDA_ARCHS);
#else
  m.attr("HAS_CUDA") = false;
  m.attr("CUDA_ARCHS") = std::string("");
#endif
  m.attr("HAS_OPENMP") = bool(omp_available());
#ifdef CPS_FAST_HOST_MARCH
  m.attr("HOST_MARCH") = std::string(CPS_FAST_HOST_MARCH);
#else
  m.attr("HOST_MARCH") = std::string("");
#endif

  py::class_<View>(m, "View", py::module_local())
      .def(py::init(&make_view), py::arg("N"), py::arg("C"), py::arg("HW"), py::arg("sN"),
           py::arg("sC"), py::arg("sP"))
      .def_readonly("N", &View::N)
      .def_readonly("C", &View::C)
      .def_readonly("HW", &View::HW);

  auto nogil = py::call_guard<py::gil_scoped_release>();

  // host
  m.def("ce_host", &cps::ce_host, nogil);
  m.def("cps_host", &cps::cps_host, nogil);
  m.def("ohem_host", &cps::ohem_host, nogil);
  m.def("confusion_host", &cps::confusion_host, nogil);

#ifdef CPS_FAST_WITH_CUDA
  m.def("device_partial_rows", &cps::device_partial_rows);
  m.def("device_ohem_workspace_bytes", &cps::device_ohem_workspace_bytes);
  m.def("ce_device", &cps::ce_device, nogil);
  m.def("cps_device", &cps::cps_device, nogil);
  m.def("ohem_device", &cps::ohem_device, nogil);
  m.def("confusion_device", &cps::confusion_device, nogil);
#endif
}
