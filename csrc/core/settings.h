#pragma once
// The grammar of flashcomm's FLASHCOMM_* settings, as C++ reads them (torch-free). The
// table of every setting, and the same grammar in Python, is python/flashcomm/settings.py.
//
// An unset or blank variable means the setting's default. Otherwise, after trimming
// spaces: a boolean is exactly 1/0, true/false, yes/no or on/off in any case; an integer
// is decimal and within the setting's bounds; a word (enum) is one of the setting's words
// (any case). Anything else throws SettingError naming the variable, the accepted values
// and the value. Callers read each setting where it is first used (a group's first use,
// the first norm call, ...), never in a static initialiser, so the error reaches the
// caller as an exception.
#include <cctype>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace flashcomm::core::settings {

class SettingError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

inline constexpr const char* kBoolText =
    "a boolean: 1/0, true/false, yes/no or on/off (any case)";

inline std::string trim(const std::string& s) {
  size_t b = 0, e = s.size();
  while (b < e && std::isspace(static_cast<unsigned char>(s[b]))) ++b;
  while (e > b && std::isspace(static_cast<unsigned char>(s[e - 1]))) --e;
  return s.substr(b, e - b);
}

inline std::string lower(std::string s) {
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

// The trimmed text of variable `name`; nullopt when it is unset or blank.
inline std::optional<std::string> raw(const char* name) {
  const char* v = std::getenv(name);
  if (v == nullptr) return std::nullopt;
  std::string text = trim(v);
  if (text.empty()) return std::nullopt;
  return text;
}

[[noreturn]] inline void fail(const char* name, const std::string& expected,
                              const std::string& text) {
  throw SettingError(std::string(name) + " must be " + expected + ", got '" + text + "'");
}

// true / false for a boolean word, nullopt for anything else.
inline std::optional<bool> bool_word(const std::string& text) {
  const std::string w = lower(trim(text));
  if (w == "1" || w == "true" || w == "yes" || w == "on") return true;
  if (w == "0" || w == "false" || w == "no" || w == "off") return false;
  return std::nullopt;
}

inline bool parse_bool(const char* name, const std::string& text) {
  const std::optional<bool> b = bool_word(text);
  if (!b) fail(name, kBoolText, text);
  return *b;
}

// A decimal integer in [lo, hi]; `what` says what it counts ("a number of bytes").
inline int64_t parse_int(const char* name, const std::string& text, int64_t lo, int64_t hi,
                         const std::string& what) {
  const std::string t = trim(text);
  const std::string expected = what + " (an integer in [" + std::to_string(lo) + ", " +
                               std::to_string(hi) + "])";
  if (t.empty() || !(std::isdigit(static_cast<unsigned char>(t[0])) || t[0] == '-' ||
                     t[0] == '+')) {
    fail(name, expected, text);
  }
  char* end = nullptr;
  errno = 0;
  const long long value = std::strtoll(t.c_str(), &end, 10);
  if (end == t.c_str() || *end != '\0' || errno != 0 || value < lo || value > hi) {
    fail(name, expected, text);
  }
  return value;
}

// The index in `words` of the word `text` (any case).
inline size_t parse_word(const char* name, const std::string& text,
                         const std::vector<std::string>& words) {
  const std::string w = lower(trim(text));
  for (size_t i = 0; i < words.size(); ++i) {
    if (w == words[i]) return i;
  }
  std::string expected = "one of";
  for (size_t i = 0; i < words.size(); ++i) {
    expected += (i == 0 ? " '" : ", '") + words[i] + "'";
  }
  fail(name, expected, text);
}

// `auto` (nullopt) or a boolean.
inline std::optional<bool> parse_auto_bool(const char* name, const std::string& text) {
  if (lower(trim(text)) == "auto") return std::nullopt;
  const std::optional<bool> b = bool_word(text);
  if (!b) fail(name, std::string("'auto' or ") + kBoolText, text);
  return b;
}

// The settings read from the environment: `fallback` when unset or blank.
inline bool env_bool(const char* name, bool fallback) {
  const std::optional<std::string> v = raw(name);
  return v ? parse_bool(name, *v) : fallback;
}

inline int64_t env_int(const char* name, int64_t fallback, int64_t lo, int64_t hi,
                       const std::string& what) {
  const std::optional<std::string> v = raw(name);
  return v ? parse_int(name, *v, lo, hi, what) : fallback;
}

// nullopt: unset or `auto`.
inline std::optional<bool> env_auto_bool(const char* name) {
  const std::optional<std::string> v = raw(name);
  return v ? parse_auto_bool(name, *v) : std::nullopt;
}

// The index of the variable's word in `words`; nullopt when unset or blank.
inline std::optional<size_t> env_word(const char* name, const std::vector<std::string>& words) {
  const std::optional<std::string> v = raw(name);
  if (!v) return std::nullopt;
  return parse_word(name, *v, words);
}

}  // namespace flashcomm::core::settings
