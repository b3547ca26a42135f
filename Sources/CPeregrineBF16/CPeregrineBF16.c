// The module is its header (include/CPeregrineBF16.h); a C target needs one source file.
