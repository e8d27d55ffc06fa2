// A small JSON reader for the packed file's META and GRPH sections.
//
// Parses RFC 8259 JSON from UTF-8 bytes into a tree of Json values. The
// parser checks UTF-8, limits nesting depth and never reads past the end of
// its input; errors come back as a Status naming the byte offset.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "dgms_rt/status.h"

namespace dgms_rt {

class Json {
 public:
  enum class Type { kNull, kBool, kNumber, kString, kArray, kObject };

  Type type() const { return type_; }
  bool is_null() const { return type_ == Type::kNull; }
  bool is_bool() const { return type_ == Type::kBool; }
  bool is_number() const { return type_ == Type::kNumber; }
  // True for a number written without fraction or exponent that fits int64
  // (Python's json module reads exactly these as int).
  bool is_int() const { return type_ == Type::kNumber && is_int_; }
  bool is_string() const { return type_ == Type::kString; }
  bool is_array() const { return type_ == Type::kArray; }
  bool is_object() const { return type_ == Type::kObject; }

  bool as_bool() const { return bool_; }
  double as_double() const { return number_; }
  int64_t as_int() const { return int_; }
  const std::string& as_string() const { return string_; }
  const std::vector<Json>& items() const { return items_; }
  const std::vector<std::pair<std::string, Json>>& members() const {
    return members_;
  }
  // Member of an object by key (the last one when repeated, as Python
  // does), or null when absent or not an object.
  const Json* find(const std::string& key) const;

  // Parses text; on failure returns an error naming the offset.
  static Status parse(const char* data, size_t size, Json* out);

  // Compact text for messages (strings quoted, long output cut).
  std::string describe(size_t max_chars = 60) const;

 private:
  friend class JsonParser;
  Type type_ = Type::kNull;
  bool bool_ = false;
  bool is_int_ = false;
  double number_ = 0.0;
  int64_t int_ = 0;
  std::string string_;
  std::vector<Json> items_;
  std::vector<std::pair<std::string, Json>> members_;
};

}  // namespace dgms_rt
