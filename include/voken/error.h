// voken's exception hierarchy. Every failure the library can foresee is one of these, with a
// message naming the file, key or argument, and what was expected versus what was found.
#pragma once

#include <stdexcept>
#include <string>

namespace voken {

// Base of everything voken throws on purpose (Python: voken.Error, a RuntimeError).
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A file or directory that should exist does not (Python: FileNotFoundError).
class FileNotFoundError : public Error {
 public:
  using Error::Error;
};

// A file exists but its bytes are not what its format promises: truncated, corrupt, unsafe
// (Python: voken.FormatError, a ValueError).
class FormatError : public Error {
 public:
  using Error::Error;
};

// A configuration (config.json, manifest, scheduler config) is missing fields or inconsistent
// (Python: voken.ConfigError, a ValueError).
class ConfigError : public Error {
 public:
  using Error::Error;
};

// Weights do not fit the model: missing, unexpected or wrongly shaped tensors
// (Python: voken.WeightsError, a ValueError).
class WeightsError : public Error {
 public:
  using Error::Error;
};

// A caller passed an invalid argument or option (Python: ValueError).
class ArgumentError : public Error {
 public:
  using Error::Error;
};

// A progress callback asked to stop (Python: voken.Cancelled).
class Cancelled : public Error {
 public:
  using Error::Error;
};

}  // namespace voken
