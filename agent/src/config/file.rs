//! The configuration file's shape: which keys each table takes and what type each value has,
//! checked on the parsed document (with its spans) before serde sees it, so that an unknown key,
//! a key in the wrong table or a value of the wrong type is named with its line, and a close
//! match is suggested.

use toml::de::{DeTable, DeValue};

use super::{ConfigError, SCALAR_SETTINGS};

/// What a key's value must be.
#[derive(Debug, Clone, Copy)]
enum Shape {
    /// A string or a number, kept as a string and checked when the layers are resolved.
    Scalar,
    /// A string; what it should hold, for the message.
    Text(&'static str),
    Bool,
    /// A whole number from `min` to `max`: "`what` from `min` to `max`".
    Int {
        what: &'static str,
        min: i64,
        max: i64,
    },
    /// A list of strings; what each should hold.
    Texts(&'static str),
    Table(&'static Section),
    /// An array of tables (`[[service]]`, or an inline array of inline tables).
    Tables(&'static Section),
}

/// One table of the file and the keys it takes.
#[derive(Debug)]
struct Section {
    /// Where it is, as a message says it: "at the top level", "under [security]".
    place: &'static str,
    fields: &'static [(&'static str, Shape)],
    /// The top level also takes every scalar setting not under `[security]`.
    scalars: bool,
    required: &'static [&'static str],
    /// The key whose value names one table of an array in messages (`service[web].port`).
    label: Option<&'static str>,
}

const PATH: Shape = Shape::Text("a file path");
const DURATION: Shape = Shape::Text("a duration such as 2s");
const COUNT: Shape = Shape::Int { what: "a whole number", min: 1, max: 100 };

const TOP: Section = Section {
    place: "at the top level",
    fields: &[
        ("dev", Shape::Bool),
        ("join", Shape::Texts("an address such as 10.0.0.5:7946 or seed.example.com:7946")),
        ("security", Shape::Table(&SECURITY)),
        ("service", Shape::Tables(&SERVICE)),
        ("upstream", Shape::Tables(&UPSTREAM)),
        ("ingress", Shape::Table(&INGRESS)),
    ],
    scalars: true,
    required: &[],
    label: None,
};

const SECURITY: Section = Section {
    place: "under [security]",
    fields: &[("cluster_key_file", PATH), ("ca_file", PATH), ("cert_file", PATH), ("key_file", PATH)],
    scalars: false,
    required: &[],
    label: None,
};

const SERVICE: Section = Section {
    place: "in a [[service]]",
    fields: &[
        ("name", Shape::Text("a service name such as profile")),
        ("port", Shape::Int { what: "a port", min: 1, max: 65535 }),
        ("weight", Shape::Int { what: "a weight", min: 1, max: grapevine_ring::MAX_WEIGHT as i64 }),
        ("pinned_to_region", Shape::Bool),
        ("check", Shape::Table(&CHECK)),
    ],
    scalars: false,
    required: &["name", "port"],
    label: Some("name"),
};

const CHECK: Section = Section {
    place: "in a service's check",
    fields: &[
        ("http", Shape::Text("an http:// URL such as http://127.0.0.1:3000/healthz")),
        ("tcp", Shape::Text("an address such as 127.0.0.1:5432")),
        ("interval", DURATION),
        ("timeout", DURATION),
        ("rise", COUNT),
        ("fall", COUNT),
    ],
    scalars: false,
    required: &[],
    label: None,
};

const UPSTREAM: Section = Section {
    place: "in an [[upstream]]",
    fields: &[
        ("service", Shape::Text("a service name such as login")),
        ("listen", Shape::Text("an address such as 127.0.0.1:9001")),
    ],
    scalars: false,
    required: &["service", "listen"],
    label: Some("service"),
};

const INGRESS: Section = Section {
    place: "under [ingress]",
    fields: &[
        ("listen", Shape::Text("an address such as 0.0.0.0:8080")),
        ("routes", Shape::Tables(&ROUTE)),
        ("affinity", Shape::Table(&AFFINITY)),
    ],
    scalars: false,
    required: &[],
    label: None,
};

const ROUTE: Section = Section {
    place: "in an ingress route",
    fields: &[
        ("host", Shape::Text("a host name such as profile.example.com")),
        ("path_prefix", Shape::Text("a path such as /login")),
        ("service", Shape::Text("a service name such as login")),
    ],
    scalars: false,
    required: &["service"],
    label: None,
};

const AFFINITY: Section = Section {
    place: "in the ingress affinity",
    fields: &[
        ("cookie", Shape::Text("a cookie name")),
        ("header", Shape::Text("a header name")),
        ("fallback", Shape::Text("client_ip or none")),
    ],
    scalars: false,
    required: &[],
    label: None,
};

const SECTIONS: &[&Section] = &[&TOP, &SECURITY, &SERVICE, &CHECK, &UPSTREAM, &INGRESS, &ROUTE, &AFFINITY];

impl Section {
    fn shape(&self, key: &str) -> Option<Shape> {
        if let Some((_, shape)) = self.fields.iter().find(|(k, _)| *k == key) {
            return Some(*shape);
        }
        let scalar = self.scalars
            && SCALAR_SETTINGS.iter().any(|(k, _)| *k == key)
            && !SECURITY.fields.iter().any(|(k, _)| *k == key);
        scalar.then_some(Shape::Scalar)
    }

    fn keys(&self) -> Vec<&'static str> {
        let mut keys: Vec<&'static str> = self.fields.iter().map(|(k, _)| *k).collect();
        if self.scalars {
            keys.extend(SCALAR_SETTINGS.iter().map(|(k, _)| *k).filter(|k| SECURITY.shape(k).is_none()));
        }
        keys
    }
}

/// A setting the file got wrong, and where (a byte offset into the file).
#[derive(Debug)]
pub(super) struct Misfit {
    pub error: ConfigError,
    pub at: usize,
}

/// Checks the document against the file's shape; the first misfit in the file, if any.
pub(super) fn check(text: &str, doc: &DeTable<'_>) -> Result<(), Misfit> {
    let mut misfits = Vec::new();
    check_table(text, doc, &TOP, "", &mut misfits);
    match misfits.into_iter().min_by_key(|m| m.at) {
        Some(m) => Err(m),
        None => Ok(()),
    }
}

fn check_table(text: &str, table: &DeTable<'_>, section: &Section, path: &str, out: &mut Vec<Misfit>) {
    let name = |key: &str| if path.is_empty() { key.to_string() } else { format!("{path}.{key}") };
    for (key, value) in table.iter() {
        let (k, at) = (key.get_ref().as_ref(), key.span().start);
        let misfit = |allowed: String| Misfit { error: ConfigError::new(name(k), shown(text, value), allowed), at };
        let Some(shape) = section.shape(k) else {
            out.push(misfit(unknown(section, k)));
            continue;
        };
        let v = value.get_ref();
        match shape {
            Shape::Scalar => {
                if !matches!(v, DeValue::String(_) | DeValue::Integer(_) | DeValue::Float(_)) {
                    out.push(misfit(format!("a single value (a string or a number), not {}", a(v))));
                }
            }
            Shape::Text(what) => {
                if !v.is_str() {
                    out.push(misfit(format!("{what}, in quotes (not {})", a(v))));
                }
            }
            Shape::Bool => match v {
                DeValue::Boolean(_) => {}
                DeValue::String(_) => out.push(misfit("true or false, without quotes".into())),
                _ => out.push(misfit(format!("true or false (not {})", a(v)))),
            },
            Shape::Int { what, min, max } => {
                let n = match v {
                    DeValue::Integer(i) => i64::from_str_radix(i.as_str(), i.radix()).ok(),
                    _ => None,
                };
                if !n.is_some_and(|n| (min..=max).contains(&n)) {
                    let quoted = if v.is_str() { ", without quotes" } else { "" };
                    out.push(misfit(format!("{what} from {min} to {max}{quoted}")));
                }
            }
            Shape::Texts(what) => {
                let ok = v.as_array().is_some_and(|items| items.iter().all(|i| i.get_ref().is_str()));
                if !ok {
                    out.push(misfit(format!("a list of strings, each {what}")));
                }
            }
            Shape::Table(inner) => match v.as_table() {
                Some(t) => check_table(text, t, inner, &name(k), out),
                None => out.push(misfit(format!("a table of settings {} (not {})", inner.place, a(v)))),
            },
            Shape::Tables(inner) => {
                let tables: Option<Vec<_>> =
                    v.as_array().map(|items| items.iter().map(|i| (i.get_ref().as_table(), i.span())).collect());
                let Some(tables) = tables else {
                    out.push(misfit(format!("one [[{k}]] table for each (not {})", a(v))));
                    continue;
                };
                for (i, (t, span)) in tables.into_iter().enumerate() {
                    let Some(t) = t else {
                        out.push(misfit(format!("a list of tables, one for each (item {} is not a table)", i + 1)));
                        break;
                    };
                    let label = inner
                        .label
                        .and_then(|l| t.get(l))
                        .and_then(|v| v.get_ref().as_str())
                        .map_or_else(|| format!("#{}", i + 1), str::to_string);
                    let here = format!("{}[{label}]", name(k));
                    for required in inner.required {
                        if t.get(*required).is_none() {
                            let what = match inner.shape(required) {
                                Some(Shape::Text(what)) => what.to_string(),
                                Some(Shape::Int { what, min, max }) => format!("{what} from {min} to {max}"),
                                _ => "a value".to_string(),
                            };
                            out.push(Misfit {
                                error: ConfigError::new(format!("{here}.{required}"), "", format!("{what} (required)")),
                                at: span.start,
                            });
                        }
                    }
                    check_table(text, t, inner, &here, out);
                }
            }
        }
    }
}

/// What to say about a key `section` does not take: where it belongs, or a close match.
fn unknown(section: &Section, key: &str) -> String {
    let elsewhere: Vec<&str> =
        SECTIONS.iter().filter(|s| !std::ptr::eq(**s, section) && s.shape(key).is_some()).map(|s| s.place).collect();
    if !elsewhere.is_empty() {
        return format!("no such setting {}; {key} belongs {}", section.place, either(&elsewhere));
    }
    if let Some(close) = closest(key, &section.keys()) {
        return format!("no such setting; did you mean {close}?");
    }
    if section.scalars {
        "no such setting; `agent run --help` and the README list them all".into()
    } else {
        format!("no such setting {}, which takes {}", section.place, section.keys().join(", "))
    }
}

/// "a", "a or b", "a, b or c".
fn either(items: &[&str]) -> String {
    match items {
        [] => String::new(),
        [one] => one.to_string(),
        [rest @ .., last] => format!("{} or {last}", rest.join(", ")),
    }
}

/// The known key `key` was most likely meant to be: the same but for case or dashes, at most
/// two edits away, or one that starts with the other.
pub(super) fn closest(key: &str, known: &[&'static str]) -> Option<&'static str> {
    let norm = key.to_ascii_lowercase().replace('-', "_");
    if let Some(k) = known.iter().find(|k| **k == norm) {
        return Some(k);
    }
    let best = known.iter().map(|k| (edit_distance(&norm, k), *k)).min_by_key(|(d, _)| *d);
    if let Some((d, k)) = best
        && d <= 2
        && norm.len() > 2
    {
        return Some(k);
    }
    known.iter().copied().find(|k| norm.len() >= 4 && (k.starts_with(&norm) || norm.starts_with(k)))
}

/// Levenshtein distance: insertions, deletions and substitutions, one byte each.
fn edit_distance(a: &str, b: &str) -> usize {
    let b = b.as_bytes();
    // `row[j]`: the distance between the prefix of `a` read so far and `b[..j]`.
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.bytes().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitute = diagonal + usize::from(ca != *cb);
            diagonal = row[j + 1];
            row[j + 1] = substitute.min(row[j] + 1).min(diagonal + 1);
        }
    }
    row[b.len()]
}

/// "a string", "an integer", "a table".
fn a(v: &DeValue<'_>) -> String {
    let t = v.type_str();
    let article = if t.starts_with(['a', 'e', 'i', 'o', 'u']) { "an" } else { "a" };
    format!("{article} {t}")
}

/// A value as a message shows it: a string's text, anything else as written (its first line).
fn shown(text: &str, value: &toml::Spanned<DeValue<'_>>) -> String {
    if let Some(s) = value.get_ref().as_str() {
        return s.to_string();
    }
    let raw = text.get(value.span()).unwrap_or("").trim();
    let first = raw.lines().next().unwrap_or("");
    if first.chars().count() > 60 { format!("{}...", first.chars().take(60).collect::<String>()) } else { first.into() }
}

/// Where in the file `setting` (as a [`ConfigError`] names it: `probe_interval`, `ca_file`,
/// `ingress.listen`, `service[web].port`) is set to `value`, as a byte offset: for an error
/// found only once the layers are merged (a duration out of range), so that it too can say
/// where. `None` if the file does not set it so (the value came from elsewhere).
pub(super) fn position_of(text: &str, setting: &str, value: &str) -> Option<usize> {
    let doc = DeTable::parse(text).ok()?;
    let doc = doc.get_ref();
    let at = |table: &DeTable<'_>, key: &str| {
        let (k, v) = table.get_key_value(key)?;
        (shown(text, v) == value).then_some(k.span().start)
    };
    if let Some((array, rest)) = setting.split_once('[') {
        // `service[web].port`: the table of the array whose label (name, service) is `web`.
        let (label, key) = rest.split_once("].")?;
        let tables = doc.get(array)?.get_ref().as_array()?;
        return tables.iter().filter_map(|t| t.get_ref().as_table()).find_map(|t| {
            let named = ["name", "service"].iter().any(|l| t.get(*l).and_then(|v| v.get_ref().as_str()) == Some(label));
            if named { at(t, key) } else { None }
        });
    }
    if let Some((table, key)) = setting.split_once('.') {
        return at(doc.get(table)?.get_ref().as_table()?, key);
    }
    at(doc, setting).or_else(|| at(doc.get("security")?.get_ref().as_table()?, setting))
}

/// The 1-based line and column (in characters) of a byte offset.
pub(super) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset.min(text.len())).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_setting_is_found_where_the_file_sets_it() {
        let text = "region = \"eu\"\nprobe_interval = \"0s\"\n[security]\nca_file = \"ca.pem\"\n\
                    [[service]]\nname = \"web\"\nweight = 0\nport = 80\n[ingress]\nlisten = \"x\"\n";
        let line = |setting: &str, value: &str| position_of(text, setting, value).map(|o| line_col(text, o).0);
        assert_eq!(line("probe_interval", "0s"), Some(2));
        assert_eq!(line("probe_interval", "1s"), None, "the file says something else: the value came from elsewhere");
        assert_eq!(line("ca_file", "ca.pem"), Some(4));
        assert_eq!(line("service[web].weight", "0"), Some(7));
        assert_eq!(line("ingress.listen", "x"), Some(10));
        assert_eq!(line("zone", "x"), None);
    }

    #[test]
    fn every_scalar_setting_has_one_place_in_the_file() {
        for (key, _) in SCALAR_SETTINGS {
            let places = SECTIONS.iter().filter(|s| s.shape(key).is_some()).count();
            assert_eq!(places, 1, "{key}");
        }
    }

    #[test]
    fn close_matches() {
        let known = TOP.keys();
        assert_eq!(closest("probe_intervall", &known), Some("probe_interval"));
        assert_eq!(closest("Probe-Interval", &known), Some("probe_interval"));
        assert_eq!(closest("gossip_advertize", &known), Some("gossip_advertise"));
        assert_eq!(closest("colour", &known), None);
        assert_eq!(closest("pinned", &SERVICE.keys()), Some("pinned_to_region"));
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    #[test]
    fn lines_and_columns_count_from_one() {
        let text = "a = 1\nbé = 2\n";
        assert_eq!(line_col(text, 0), (1, 1));
        assert_eq!(line_col(text, 6), (2, 1));
        assert_eq!(line_col(text, text.find('=').unwrap()), (1, 3));
        assert_eq!(line_col(text, text.rfind('=').unwrap()), (2, 4), "columns count characters, not bytes");
    }
}
